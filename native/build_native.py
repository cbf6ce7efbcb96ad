"""cffi build script (out-of-line API mode) for blockstore._native.

Run by setuptools through `cffi_modules` in setup.py; it is not part of the installed package. setup.py calls
require_xxhash() before compiling (not at import: an sdist builds without a compiler or xxHash).
The cdef below is the ABI Python sees: it repeats native/blockstore.h without the comments, and the
constants as `static const` so cffi takes their values from the compiled header.
"""

import os
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

SOURCES = ["record.c", "io.c", "batch.c", "multi.c", "layers.c", "scan.c", "fault_io.c"]

CDEF = """
static const int BS_OK, BS_EINVAL, BS_EIO, BS_ENOSPC, BS_ECORRUPT, BS_ECHECKSUM, BS_EVERSION,
    BS_ENOMEM, BS_ENOENT, BS_ETRUNCATED;
static const int BS_FORMAT_VERSION, BS_BLOCK_HEADER_SIZE, BS_RECORD_HEADER_SIZE, BS_FOOTER_SIZE,
    BS_PAGE, BS_MAX_KEY, BS_MAX_META;
static const int BS_KIND_KV, BS_KIND_CHUNK, BS_KIND_TOMBSTONE, BS_REC_ALIGNED;
static const int BS_APPEND_HAVE_CHECKSUMS, BS_APPEND_SYNC, BS_READ_VERIFY, BS_READ_WILLNEED,
    BS_SCAN_VERIFY_PAYLOAD;
static const int BS_SCAN_END, BS_SCAN_MORE, BS_SCAN_INVALID;
static const int BS_LAYER_PENDING, BS_LAYER_DONE, BS_LAYER_FAILED, BS_LAYER_CANCELLED;
static const int BS_FAULT_OP_WRITE, BS_FAULT_OP_READ, BS_FAULT_OP_SYNC, BS_FAULT_OP_OPEN,
    BS_FAULT_OP_OTHER, BS_FAULT_TEAR_EIO, BS_FAULT_TEAR_SHORT;

int bs_last_errno(void);

typedef struct bs_record_info {
    uint8_t kind; uint16_t flags; uint32_t key_len; uint32_t meta_len; uint32_t payload_off;
    uint32_t ns; uint64_t payload_len; uint64_t record_len; uint64_t seq; uint64_t payload_xxh3;
} bs_record_info;
typedef struct bs_block_header {
    uint32_t format_version; uint32_t flags; uint64_t block_id; uint64_t store_id;
    uint64_t created_ns; uint64_t partition_hash;
} bs_block_header;
typedef struct bs_footer {
    uint32_t format_version; uint32_t flags; uint64_t block_id; uint64_t data_end;
    uint64_t record_count; uint64_t min_seq; uint64_t max_seq;
} bs_footer;

uint64_t bs_xxh3(const uint8_t *buf, size_t len);
void bs_xxh3_many(size_t n, const uint8_t *const *bufs, const uint64_t *lens, uint64_t *out);
int bs_record_decode(const uint8_t *buf, size_t len, bs_record_info *out);
int bs_record_layout(uint64_t start, uint32_t key_len, uint32_t meta_len, uint64_t payload_len,
                     uint16_t flags, uint32_t *payload_off, uint64_t *record_len);
int bs_record_encode(const bs_record_info *info, const uint8_t *key, const uint8_t *meta,
                     uint8_t *out, size_t out_len);
int bs_block_header_encode(const bs_block_header *h, uint8_t *out, size_t out_len);
int bs_block_header_decode(const uint8_t *buf, size_t len, bs_block_header *out);
int bs_footer_encode(const bs_footer *f, uint8_t *out, size_t out_len);
int bs_footer_decode(const uint8_t *buf, size_t len, bs_footer *out);

int bs_file_open(const char *path, int create, int *fd_out);
int bs_file_open_ro(const char *path, int *fd_out);
int bs_file_close(int fd);
int bs_file_sync(int fd);
int bs_dir_sync(const char *path);
int bs_file_truncate(int fd, uint64_t len);
int bs_file_unlink(const char *path);
int bs_file_size(int fd, uint64_t *size_out);
int bs_file_pread(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *got);
int bs_file_pwrite(int fd, const uint8_t *buf, size_t len, uint64_t off);
int bs_fadvise_dontneed(int fd);

typedef struct bs_append_item {
    uint8_t kind; uint16_t flags; uint32_t ns;
    const uint8_t *key; uint32_t key_len;
    const uint8_t *meta; uint32_t meta_len;
    const uint8_t *payload; uint64_t payload_len;
    uint64_t seq; uint64_t payload_xxh3;
    uint64_t offset; uint32_t payload_off; uint64_t record_len;
} bs_append_item;
int bs_append(int fd, uint64_t offset, bs_append_item *items, size_t n, int flags, uint64_t *end_out);

typedef struct bs_read_item {
    uint64_t offset; uint64_t len; uint8_t *dst; uint64_t expect_xxh3; int32_t status;
} bs_read_item;
int bs_read_many(int fd, bs_read_item *items, size_t n, uint64_t max_gap, int flags);
int bs_read_files(const int *fds, const size_t *counts, size_t files, bs_read_item *items, uint64_t max_gap,
                  int flags);

typedef struct bs_layer_job {
    const int *fds; const size_t *counts; size_t files; bs_read_item *items;
    int32_t state; int32_t rc; int32_t err; int32_t parts_left; int32_t failed; int32_t cancelled;
} bs_layer_job;
typedef struct bs_layer_queue { uint64_t next; int32_t stop; } bs_layer_queue;
int bs_layer_read(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q, uint64_t max_gap, int flags);
int bs_layer_poll(const bs_layer_job *job);
int bs_layer_wait(bs_layer_job *job);
void bs_layer_cancel(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q);

typedef struct bs_scan_entry {
    uint64_t offset; bs_record_info info; uint64_t arena_off; int32_t payload_status;
} bs_scan_entry;
int bs_scan_block(int fd, uint64_t start, uint64_t end, int flags, bs_scan_entry *entries,
                  size_t cap, uint8_t *arena, size_t arena_len, size_t *n_out, uint64_t *next_out,
                  int *stop_out);

void bs_fault_install(void);
void bs_fault_arm(int op_mask, uint64_t nth, int err, int persistent);
uint64_t bs_fault_op_count(void);
int bs_fault_crash(uint64_t torn_seed);
void bs_fault_uninstall(void);
uint64_t bs_fault_fired(void);
void bs_fault_arm_torn(uint64_t nth, int mode, int err, uint64_t seed);
int bs_fault_power_image(const char *root, const char *dst, uint64_t torn_seed);
void bs_fault_arm_images(int op_mask, uint64_t nth, const char *root, const char *dst, uint64_t torn_seed);
int bs_fault_images_taken(void);
uint64_t bs_fault_image_op_count(void);
void bs_fault_arm_image_points(int op_mask, const uint64_t *points, const uint64_t *seeds, int n, const char *root,
                               const char *dst);
int bs_fault_power_track(const char *root, const char *shadow);
int bs_fault_power_snapshot(const char *dir);
uint64_t bs_fault_power_unmodelled(void);
"""

# BLOCKSTORE_SANITIZE=1 builds the core with AddressSanitizer and UBSan (fuzz and sanitizer runs).
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if os.environ.get("BLOCKSTORE_SANITIZE") else []

XXHASH_PACKAGES = "install libxxhash-dev (Debian, Ubuntu) or xxhash-devel (Fedora, RHEL), or xxhash (Homebrew, conda-forge)"


def _compiler() -> list[str]:
    return (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()


def _builds(source: str, link: list[str] | None = None) -> bool:
    """Whether the C compiler setuptools will use compiles `source` (with `link`: links it, with those flags)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = [*_compiler(), src, "-o", os.path.join(tmp, "probe"), *(["-c"] if link is None else link)]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except OSError:
            return False


def require_xxhash() -> None:
    """Stop the build with one line naming the package when xxHash's header or library is missing: without
    this, the build ends in a raw compiler error ("xxhash.h: No such file") that names no package. Each probe
    is checked against one without xxHash, so a compiler that cannot build anything is left for setuptools
    to report in its own words rather than blamed on xxHash."""
    main = "int main(void) { return 0; }\n"
    if _builds(main) and not _builds("#include <xxhash.h>\n" + main):
        sys.exit(f"blockstore build: xxhash.h not found: {XXHASH_PACKAGES}")
    use = "#include <xxhash.h>\nint main(void) { return (int)XXH64(\"\", 0, 0); }\n"
    if _builds(main, link=[]) and not _builds(use, link=["-lxxhash"]):
        sys.exit(f"blockstore build: the xxHash library (libxxhash) not found: {XXHASH_PACKAGES}")


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "blockstore._native",
    '#include "blockstore.h"',
    # setuptools wants sources relative to the project root, where the build runs
    sources=[f"native/{name}" for name in SOURCES],
    include_dirs=["native"],
    libraries=["xxhash"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"] + SANITIZE,
    extra_link_args=SANITIZE,
)

if __name__ == "__main__":
    require_xxhash()
    ffibuilder.compile(verbose=True)
