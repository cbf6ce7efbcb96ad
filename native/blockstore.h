/* blockstore C core: record encoding, batched appends and reads, block scans.
 *
 * Contracts, for every function below unless it says otherwise:
 *  - Returns BS_OK (0) or a negative BS_E* code; on failure outputs are unspecified.
 *  - Buffers are (pointer, length) pairs owned by the caller; the core never keeps a pointer after
 *    returning and never allocates memory that outlives a call.
 *  - Thread-safe: no global state except the file-operations table, which is set before use.
 *  - Never crashes on any byte sequence read from disk: every length is checked against the
 *    buffer it claims to describe (fuzzed in fuzz/).
 *  - All file I/O goes through bs_io (see bs_fileops), so tests can inject faults.
 * The on-disk layouts are specified in docs/format.md.
 */
#ifndef BLOCKSTORE_H
#define BLOCKSTORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* ---- error codes (mapped one-to-one to Python exceptions by blockstore/errors.py CODE_TO_ERROR) ---- */
#define BS_OK 0
#define BS_EINVAL -1     /* InvalidArgument: a caller's argument breaks a documented limit */
#define BS_EIO -2        /* IOErrorBS: the OS reported an I/O error (errno in bs_last_errno) */
#define BS_ENOSPC -3     /* NoSpace: ENOSPC or EDQUOT */
#define BS_ECORRUPT -4   /* CorruptionError: bytes on disk do not parse as the format says */
#define BS_ECHECKSUM -5  /* ChecksumMismatch: a structure parsed but its checksum disagrees */
#define BS_EVERSION -6   /* FormatVersionError: written by a newer format version */
#define BS_ENOMEM -7     /* OutOfMemory */
#define BS_ENOENT -8     /* NotFound: a file is missing */
#define BS_ETRUNCATED -9 /* TruncatedError: the file ends inside a structure */

/* errno of the last failing OS call on this thread (0 if the failure was not an OS error). */
int bs_last_errno(void);

/* ---- format constants (docs/format.md) ---- */
#define BS_FORMAT_VERSION 1
#define BS_BLOCK_HEADER_SIZE 4096
#define BS_RECORD_HEADER_SIZE 64
#define BS_FOOTER_SIZE 64
#define BS_PAGE 4096
#define BS_MAX_KEY 4096
#define BS_MAX_META 65536
#define BS_MAX_PAYLOAD 0xFFFFFFFFull

#define BS_KIND_KV 1
#define BS_KIND_CHUNK 2
#define BS_KIND_TOMBSTONE 3
#define BS_REC_ALIGNED 0x0001

typedef struct bs_record_info {
    uint8_t kind;
    uint16_t flags;
    uint32_t key_len;
    uint32_t meta_len;
    uint32_t payload_off;
    uint32_t ns;
    uint64_t payload_len;
    uint64_t record_len;
    uint64_t seq;
    uint64_t payload_xxh3;
} bs_record_info;

typedef struct bs_block_header {
    uint32_t format_version;
    uint32_t flags;
    uint64_t block_id;
    uint64_t store_id;
    uint64_t created_ns;
    uint64_t partition_hash;
} bs_block_header;

typedef struct bs_footer {
    uint32_t format_version;
    uint32_t flags;
    uint64_t block_id;
    uint64_t data_end;
    uint64_t record_count;
    uint64_t min_seq;
    uint64_t max_seq;
} bs_footer;

/* ---- checksums (xxh3_64 from the system libxxhash) ---- */
uint64_t bs_xxh3(const uint8_t *buf, size_t len);
/* n independent checksums; blocking (call with the GIL released). */
void bs_xxh3_many(size_t n, const uint8_t *const *bufs, const uint64_t *lens, uint64_t *out);

/* ---- record header ---- */
/* Decode and verify the header in buf[0..64) plus key and meta, which must follow it in buf
 * (len >= 64 + key_len + meta_len, else BS_ETRUNCATED). Checks magic, version, kind, flags,
 * limits and the header checksum. Does not read the payload. */
int bs_record_decode(const uint8_t *buf, size_t len, bs_record_info *out);
/* Layout of a record that would start at file offset `start`: fills payload_off and record_len. */
int bs_record_layout(uint64_t start, uint32_t key_len, uint32_t meta_len, uint64_t payload_len,
                     uint16_t flags, uint32_t *payload_off, uint64_t *record_len);
/* Encode header+key+meta+zero padding (payload_off bytes) into out; out_len >= info->payload_off.
 * info->payload_off/record_len must come from bs_record_layout. */
int bs_record_encode(const bs_record_info *info, const uint8_t *key, const uint8_t *meta,
                     uint8_t *out, size_t out_len);

/* ---- block header and footer ---- */
int bs_block_header_encode(const bs_block_header *h, uint8_t *out, size_t out_len); /* out_len >= 64 */
int bs_block_header_decode(const uint8_t *buf, size_t len, bs_block_header *out);
int bs_footer_encode(const bs_footer *f, uint8_t *out, size_t out_len);               /* out_len >= 64 */
int bs_footer_decode(const uint8_t *buf, size_t len, bs_footer *out);

/* ---- file operations seam ---- */
typedef struct bs_fileops {
    int (*open)(void *ctx, const char *path, int flags, int mode);
    ssize_t (*pwritev)(void *ctx, int fd, const struct iovec *iov, int iovcnt, off_t off);
    ssize_t (*preadv)(void *ctx, int fd, const struct iovec *iov, int iovcnt, off_t off);
    int (*fdatasync)(void *ctx, int fd);
    int (*fsync)(void *ctx, int fd);
    int (*ftruncate)(void *ctx, int fd, off_t len);
    int (*close)(void *ctx, int fd);
    int (*unlink)(void *ctx, const char *path);
    off_t (*size)(void *ctx, int fd);
    int (*advise_willneed)(void *ctx, int fd, off_t off, off_t len); /* a hint: errors are ignored */
    void *ctx;
} bs_fileops;

/* Replace the table (NULL restores the OS one). Not thread-safe: call while no I/O runs. */
void bs_io_set(const bs_fileops *ops);

/* File primitives, each one call through the table; blocking. */
int bs_file_open(const char *path, int create, int *fd_out);   /* O_RDWR|O_CLOEXEC (+O_CREAT) */
int bs_file_open_ro(const char *path, int *fd_out);
int bs_file_close(int fd);
int bs_file_sync(int fd);                                       /* fdatasync */
int bs_dir_sync(const char *path);                              /* fsync of a directory */
int bs_file_truncate(int fd, uint64_t len);
int bs_file_unlink(const char *path);
int bs_file_size(int fd, uint64_t *size_out);
int bs_file_pread(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *got);
int bs_file_pwrite(int fd, const uint8_t *buf, size_t len, uint64_t off);
int bs_fadvise_dontneed(int fd);

/* ---- batched append ---- */
typedef struct bs_append_item {
    /* in */
    uint8_t kind;
    uint16_t flags; /* BS_REC_ALIGNED may be forced; the core sets it for payloads >= 4096 */
    uint32_t ns;
    const uint8_t *key;
    uint32_t key_len;
    const uint8_t *meta;
    uint32_t meta_len;
    const uint8_t *payload;
    uint64_t payload_len;
    uint64_t seq;
    uint64_t payload_xxh3; /* in if BS_APPEND_HAVE_CHECKSUMS, else out */
    /* out */
    uint64_t offset;      /* record start */
    uint32_t payload_off;
    uint64_t record_len;
} bs_append_item;

#define BS_APPEND_HAVE_CHECKSUMS 1
#define BS_APPEND_SYNC 2

/* Append n records at `offset` (the block's current tail) with as few pwritev calls as IOV_MAX
 * allows, then fdatasync if BS_APPEND_SYNC. On success *end_out is the new tail. On failure nothing
 * past `offset` may be trusted (the caller truncates back). Blocking. */
int bs_append(int fd, uint64_t offset, bs_append_item *items, size_t n, int flags, uint64_t *end_out);

/* ---- batched read ---- */
typedef struct bs_read_item {
    uint64_t offset;       /* file offset of the payload */
    uint64_t len;
    uint8_t *dst;          /* caller-owned, >= len bytes */
    uint64_t expect_xxh3;
    int32_t status;        /* out: BS_OK, BS_ECHECKSUM, BS_ETRUNCATED, BS_EIO, ... */
} bs_read_item;

#define BS_READ_VERIFY 1
#define BS_READ_WILLNEED 2 /* announce every run to the kernel before reading the first (cold reads) */

/* Read n payloads from one file. Items must be sorted by offset and must not overlap. Runs of items
 * whose gaps are <= max_gap bytes are read with one preadv (gaps land in scratch memory). Per-item
 * status; returns BS_OK unless the whole call failed (allocation, invalid arguments). Blocking. */
int bs_read_many(int fd, bs_read_item *items, size_t n, uint64_t max_gap, int flags);

/* bs_read_many over several files in one call: items[0 .. counts[0]) from fds[0], the next counts[1]
 * items from fds[1], and so on (each file's items sorted by offset, as bs_read_many wants). Per-item
 * status; returns BS_OK, or the first failure of a whole file's call (then later files are not read).
 * BS_READ_WILLNEED announces every item of each file whose first item's page is not cached before the
 * first read (cold reads get depth; warm ones no syscalls). Blocking. */
int bs_read_files(const int *fds, const size_t *counts, size_t files, bs_read_item *items, uint64_t max_gap,
                  int flags);

/* ---- the blend's layer loader (layers.c): readers in C, each one call, claiming layers in order ---- */
#define BS_LAYER_PENDING 0
#define BS_LAYER_DONE 1
#define BS_LAYER_FAILED 2    /* a whole-call failure (rc) or an item's status; err: bs_last_errno then */
#define BS_LAYER_CANCELLED 3 /* never read: an earlier layer failed, or the caller cancelled */

typedef struct bs_layer_job {
    const int *fds;        /* one layer's reads, as bs_read_files takes them */
    const size_t *counts;
    size_t files;
    bs_read_item *items;
    int32_t state;         /* BS_LAYER_*: written once, by the reader that finished its last part */
    int32_t rc;            /* a failed part's bs_read_many return (BS_OK if only items failed) */
    int32_t err;           /* the first failed part's bs_last_errno() when FAILED */
    int32_t parts_left;    /* set to `files` by the caller (a job of no file: state set DONE by the caller) */
    int32_t failed;        /* zero to start: set by a part that failed */
    int32_t cancelled;     /* zero to start: set by a part that was never read */
} bs_layer_job;

typedef struct bs_layer_queue {
    uint64_t next;         /* the next job to claim (zero to start) */
    int32_t stop;          /* set by a failure or bs_layer_cancel: claim no more */
} bs_layer_queue;

/* One reader: claims parts (one file of a job each) in job order (shared with every other reader of `q`)
 * and reads each with bs_read_many(flags); a job's state is published by the reader of its last part;
 * returns when none is left, or after the first failure (then every unclaimed part is cancelled: a job
 * with one is CANCELLED, unless one of its parts FAILED). Several threads call it at once on the same
 * jobs. Blocking. With BS_READ_WILLNEED, the first part of a job announces the job LOOKAHEAD after it. */
int bs_layer_read(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q, uint64_t max_gap, int flags);
/* A job's state now (no wait). */
int bs_layer_poll(const bs_layer_job *job);
/* Waits until the job is no longer PENDING; returns its state. */
int bs_layer_wait(bs_layer_job *job);
/* Readers claim no more; every unclaimed part is cancelled (claimed ones finish as they would). */
void bs_layer_cancel(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q);

/* ---- block scan (recovery, fsck) ---- */
typedef struct bs_scan_entry {
    uint64_t offset;       /* record start */
    bs_record_info info;
    uint64_t arena_off;    /* key then meta, copied into the caller's arena */
    int32_t payload_status;/* BS_OK, BS_ECHECKSUM, or 1 if not verified */
} bs_scan_entry;

#define BS_SCAN_VERIFY_PAYLOAD 1

#define BS_SCAN_END 0       /* reached `end` (or a footer at exactly that point) */
#define BS_SCAN_MORE 1      /* out of room in entries or arena: call again from *next_out */
#define BS_SCAN_INVALID 2   /* stopped at an invalid or torn record at *next_out */

/* Scan records from `start` up to `end` (exclusive; use the file size or a footer's data_end).
 * Fills up to cap entries, copying key+meta into arena. *stop_out tells why it stopped;
 * *next_out is the offset to resume from (or of the invalid record). Blocking. */
int bs_scan_block(int fd, uint64_t start, uint64_t end, int flags, bs_scan_entry *entries,
                  size_t cap, uint8_t *arena, size_t arena_len, size_t *n_out, uint64_t *next_out,
                  int *stop_out);

/* ---- fault-injecting file operations (tests; see native/fault_io.c) ---- */
#define BS_FAULT_OP_WRITE 1
#define BS_FAULT_OP_READ 2
#define BS_FAULT_OP_SYNC 4
#define BS_FAULT_OP_OPEN 8
#define BS_FAULT_OP_OTHER 16

/* Install the fault layer over the OS table and reset its state (counters, tracked files). */
void bs_fault_install(void);
/* Put the OS table back (the fault layer keeps its bookkeeping until the next install). */
void bs_fault_uninstall(void);
/* Fail the nth (1-based, counted from now) operation whose kind is in op_mask with errno err;
 * persistent != 0 keeps failing every later matching op. nth == 0 disarms. */
void bs_fault_arm(int op_mask, uint64_t nth, int err, int persistent);
uint64_t bs_fault_op_count(void);
/* Simulated power loss: every tracked file loses the bytes written since its last sync.
 * torn_seed != 0 keeps a random 512-byte-granular prefix of the unsynced bytes instead (a torn
 * write); files created since the last sync of their directory vanish when torn_seed == 0. */
int bs_fault_crash(uint64_t torn_seed);
/* How many operations the armed fault has failed (or torn) since it was armed. */
uint64_t bs_fault_fired(void);

/* Tear the nth write (pwritev) from now instead of refusing it: a prefix of the bytes ending on a
 * 512-byte file offset, chosen from `seed`, reaches the file. BS_FAULT_TEAR_EIO: then the call fails
 * with err (EIO if 0) and the sector after the prefix holds garbage; BS_FAULT_TEAR_SHORT: the call
 * returns the prefix's length, a legal short write the caller must continue. nth == 0 disarms. */
#define BS_FAULT_TEAR_EIO 1
#define BS_FAULT_TEAR_SHORT 2
void bs_fault_arm_torn(uint64_t nth, int mode, int err, uint64_t seed);

/* Write into dst (created; must not exist; its parent must) the tree under root as a power loss now
 * would leave it, without touching root: tracked files cut to their synced length (or, with a seed,
 * torn at a random sector of their unsynced tail, sometimes followed by a garbage sector), files
 * whose creation was never made durable left out (with a seed: at random), untracked files whole.
 * Paths are matched as the store opened them: pass root spelled as the store's path. */
int bs_fault_power_image(const char *root, const char *dst, uint64_t torn_seed);
/* Take power images of root at the nth operation (1-based, from now) whose kind is in op_mask:
 * dst/before (just before it runs) and dst/after (once it has run); with torn_seed != 0 also
 * dst/before-torn and dst/after-torn. dst must exist. nth == 0 disarms. Counted apart from
 * bs_fault_arm, so both can be armed at once. */
void bs_fault_arm_images(int op_mask, uint64_t nth, const char *root, const char *dst, uint64_t torn_seed);
/* Images written since bs_fault_arm_images, and operations of its mask counted since then. */
int bs_fault_images_taken(void);
uint64_t bs_fault_image_op_count(void);
/* Take one power image of root at each of the n operations points[0] < points[1] < ... (1-based,
 * counted from now over op_mask), just before it runs: dst/pNNNNN for points[NNNNN], torn (with a
 * garbage sector at random) when seeds[i] != 0. n == 0 disarms them and just resets the count.
 * Disarms bs_fault_arm_images. */
void bs_fault_arm_image_points(int op_mask, const uint64_t *points, const uint64_t *seeds, int n, const char *root,
                               const char *dst);
/* The strict model of directory entries for images of paths under root (fault_io.c's header says it
 * all): every directory under root is durable as it is now; from then on a name is durable only as of
 * its parent's last fsync through this layer. Unlinked durable files are kept as hard links in shadow
 * (an existing directory outside root, on the same file system) until their unlink is durable.
 * root == NULL turns the model off (images as bs_fault_power_image describes). Paths must be spelled
 * as realpath() spells them. */
int bs_fault_power_track(const char *root, const char *shadow);
/* Directory dir (RocksDB's) is durable as it is now (empty if it is not there yet), as a whole:
 * later images take it from here (hard links into shadow and the files' current sizes; in torn
 * images a random part of its newest WAL's later tail). No effect outside the tracked root. */
int bs_fault_power_snapshot(const char *dir);
/* Durable entries an image could not reproduce (renamed over outside this layer): the live file was used. */
uint64_t bs_fault_power_unmodelled(void);

#endif
