/* A fault-injecting file-operations table, for tests (never installed by the store itself).
 *
 * Model, in the spirit of LevelDB's and RocksDB's fault-injection environments:
 *  - Every operation is counted by kind; the nth matching one (and, if persistent, every later one)
 *    fails with a chosen errno before touching the file.
 *  - Per file path the layer remembers the size at the last fdatasync/fsync ("synced length") and
 *    whether the file's creation was made durable by an fsync of its directory.
 *  - bs_fault_crash() simulates power loss: each tracked file is cut back to its synced length, or,
 *    with a seed, to a random 512-byte-granular point inside its unsynced tail (a torn write); files
 *    whose creation was never made durable vanish (only without a seed, so torn runs keep them).
 *  - bs_fault_arm_torn() tears one write instead of refusing it: a random 512-byte-granular prefix
 *    (by file offset, as a disk writes sectors) reaches the file, and the call either fails (with a
 *    garbage sector after the prefix, as a half-written sector reads back) or reports a short write.
 *  - bs_fault_power_image() writes, into another directory, the tree a power loss would leave right
 *    now (the same rules as bs_fault_crash, optionally with a garbage sector after a torn tail), and
 *    leaves the live files alone; bs_fault_arm_images() takes such images just before and just
 *    after the nth matching operation, so a test can run a workload to its end and then check what
 *    a power loss at that exact point would have left. Files the layer does not track (RocksDB's,
 *    MANIFEST.json) are copied whole: blockstore's sync mode syncs every directory write.
 * Only appends are modelled (blockstore never overwrites synced bytes), which is why a file's
 * unsynced state is fully described by one length. Not modelled by default: an unlink or a truncation
 * undone by a power loss before its directory or file was synced.
 *
 * The strict model of directory entries (bs_fault_power_track, used by tests/power_loss.py): under a
 * tracked root, a name (a file or a directory, created, unlinked or renamed by anyone, through this
 * layer or not) survives a power loss only as of the last fsync of its parent directory through this
 * layer; until the first such fsync a directory holds what it held when tracking began (the baseline).
 * Each directory fsync records the entries (name, inode) the directory then held. An image walks the
 * root from those records: a durable entry whose inode is still there is copied from the live file
 * (a tracked file up to its synced length); a durable entry unlinked since comes back, from a hard
 * link this layer made (in the shadow directory) before the unlink; an entry made since is left
 * out. With a torn seed each such undurable change goes either way at random, per entry. A directory
 * registered by bs_fault_power_snapshot (RocksDB's) is imaged whole from its latest snapshot (hard
 * links and sizes taken at that call; the caller calls it at each synced RocksDB write), with, in
 * torn images, a random sector-granular part of its newest WAL's unsynced tail. Not modelled: a
 * rename over a durable name that no unlink here saw (the old inode is gone; counted by
 * bs_fault_power_unmodelled, the live file is used).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockstore.h"
#include "internal.h"

#define MAX_TRACKED 8192
#define MAX_FD 65536

typedef struct tracked {
    char *path;
    uint64_t synced_len;
    int creation_durable;
} tracked;

/* the strict model of directory entries (bs_fault_power_track) */
typedef struct dent {
    char *name;
    ino_t ino;
    int is_dir;
} dent;
struct dent_list {
    dent *v;
    int n;
};
typedef struct dirstate { /* a directory's entries as of its last fsync (or the baseline) */
    char *path;
    struct dent_list ents;
} dirstate;
typedef struct grave { /* a durable name unlinked since its directory's last fsync */
    char *path, *shadow;
    ino_t ino;
    uint64_t synced_len;
} grave;
typedef struct snapfile {
    char *name, *shadow;
    ino_t ino;
    uint64_t size;
    int64_t log_no; /* NNNNNN of NNNNNN.log, else -1 */
} snapfile;
typedef struct snapdir { /* a directory imaged whole from its last snapshot (RocksDB's) */
    char *path;
    snapfile *files;
    int n;
} snapdir;

static char *track_root, *shadow_root;
static uint64_t shadow_seq, unmodelled;
static dirstate *dirs;
static int ndirs, capdirs;
static grave *graves;
static int ngraves, capgraves;
static snapdir *snaps;
static int nsnaps, capsnaps;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static tracked files[MAX_TRACKED];
static int fd_file[MAX_FD]; /* fd -> index in files + 1, 0 = untracked */
static char *fd_dir[MAX_FD];  /* fd -> directory path, for directory fsyncs */
static uint64_t op_count, fail_at, fired;
static int fail_mask, fail_errno, fail_persistent;
static int tear_mode; /* 0: refuse the op; else a BS_FAULT_TEAR_* way of tearing the nth write */
static uint64_t tear_rng;
/* power images at the nth op matching image_mask (its own counter: independent of fail_*) */
static uint64_t image_count, image_at;
static int image_mask, images_taken;
static uint64_t image_seed;
static char *image_root, *image_dst;

/* images at a list of ops of image_mask (bs_fault_arm_image_points): one image per point */
static uint64_t *pt_at, *pt_seed;
static int pt_n, pt_next;
static char *pt_root, *pt_dst;

static uint64_t next_rand(uint64_t *s);
static int power_image_locked(const char *root, const char *dst, uint64_t torn_seed, int garble);
static int strict_list_for_sync(int fd, char **canon_out, struct dent_list *out);
static void strict_dir_synced(char *canon, struct dent_list *ents);
static grave strict_before_unlink(const char *path);
static void strict_after_unlink(grave g, int ok);

static tracked *find_path(const char *path) {
    for (int i = 0; i < MAX_TRACKED; i++)
        if (files[i].path && strcmp(files[i].path, path) == 0) return &files[i];
    return NULL;
}

static tracked *add_path(const char *path, uint64_t synced, int durable) {
    for (int i = 0; i < MAX_TRACKED; i++)
        if (!files[i].path) {
            files[i] = (tracked){strdup(path), synced, durable};
            return &files[i];
        }
    return NULL; /* table full: the file is simply not tracked */
}

/* Count an operation; return the errno to fail it with, or 0. */
static int should_fail(int kind) {
    pthread_mutex_lock(&mu);
    int err = 0;
    if (kind & fail_mask) {
        op_count++;
        if (fail_at && (op_count == fail_at || (fail_persistent && op_count > fail_at))) err = fail_errno;
        if (err) fired++;
    } else if (!fail_mask) {
        op_count++;
    }
    pthread_mutex_unlock(&mu);
    return err;
}

/* Power images around the nth op of image_mask: "before" images are taken here, before the op runs;
 * the return value tells the op to take the "after" images once it has run (image_after). */
static int image_before(int kind) {
    pthread_mutex_lock(&mu);
    int hit = 0;
    if (kind & image_mask) image_count++;
    while ((kind & image_mask) && pt_next < pt_n && pt_at[pt_next] <= image_count) {
        if (pt_at[pt_next] == image_count && pt_root && pt_dst) {
            char dst[PATH_MAX];
            snprintf(dst, sizeof dst, "%s/p%05d", pt_dst, pt_next);
            if (power_image_locked(pt_root, dst, pt_seed[pt_next], pt_seed[pt_next] != 0) == BS_OK) images_taken++;
        }
        pt_next++;
    }
    if ((kind & image_mask) && image_count == image_at && image_root && image_dst) {
        hit = 1;
        char dst[PATH_MAX];
        snprintf(dst, sizeof dst, "%s/before", image_dst);
        if (power_image_locked(image_root, dst, 0, 0) == BS_OK) images_taken++;
        if (image_seed) {
            snprintf(dst, sizeof dst, "%s/before-torn", image_dst);
            if (power_image_locked(image_root, dst, image_seed, 1) == BS_OK) images_taken++;
        }
    }
    pthread_mutex_unlock(&mu);
    return hit;
}

static void image_after(int hit) {
    if (!hit) return;
    pthread_mutex_lock(&mu);
    char dst[PATH_MAX];
    snprintf(dst, sizeof dst, "%s/after", image_dst);
    if (power_image_locked(image_root, dst, 0, 0) == BS_OK) images_taken++;
    if (image_seed) {
        snprintf(dst, sizeof dst, "%s/after-torn", image_dst);
        if (power_image_locked(image_root, dst, image_seed ^ 0x9e3779b97f4a7c15ull, 1) == BS_OK) images_taken++;
    }
    pthread_mutex_unlock(&mu);
}

static int f_open_op(void *ctx, const char *path, int flags, int mode);

static int f_open(void *ctx, const char *path, int flags, int mode) {
    int hit = image_before(BS_FAULT_OP_OPEN);
    int saved, fd = f_open_op(ctx, path, flags, mode);
    saved = errno;
    image_after(hit);
    errno = saved;
    return fd;
}

static int f_open_op(void *ctx, const char *path, int flags, int mode) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_OPEN);
    if (err) { errno = err; return -1; }
    struct stat st;
    int existed = stat(path, &st) == 0;
    int fd = open(path, flags, mode);
    if (fd < 0 || fd >= MAX_FD) return fd;
    pthread_mutex_lock(&mu);
    if (flags & O_DIRECTORY) {
        free(fd_dir[fd]);
        fd_dir[fd] = strdup(path);
    } else {
        tracked *t = find_path(path);
        if (!t) t = add_path(path, existed ? (uint64_t)st.st_size : 0, existed);
        fd_file[fd] = t ? (int)(t - files) + 1 : 0;
    }
    pthread_mutex_unlock(&mu);
    return fd;
}

/* Write the first `len` bytes the iovec array describes (a torn write's prefix). */
static ssize_t write_prefix(int fd, const struct iovec *iov, int cnt, off_t off, size_t len) {
    size_t done = 0;
    for (int i = 0; i < cnt && done < len; i++) {
        size_t want = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        size_t put = 0;
        while (put < want) {
            ssize_t r = pwrite(fd, (const uint8_t *)iov[i].iov_base + put, want - put, off + (off_t)(done + put));
            if (r <= 0) return -1;
            put += (size_t)r;
        }
        done += want;
    }
    return (ssize_t)done;
}

/* The nth write, torn: a prefix ending on a 512-byte file offset reaches the file. */
static ssize_t torn_write(int fd, const struct iovec *iov, int cnt, off_t off, int err) {
    size_t total = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    uint64_t first = ((uint64_t)off + 511) / 512 * 512; /* first sector boundary at or after off */
    uint64_t end = (uint64_t)off + total;
    /* boundaries b in [first, end) are the possible ends of the prefix; an error may also tear at 0 */
    uint64_t lo = (err || first > (uint64_t)off) ? first : first + 512;
    pthread_mutex_lock(&mu);
    uint64_t r = next_rand(&tear_rng);
    uint64_t g = next_rand(&tear_rng);
    pthread_mutex_unlock(&mu);
    size_t prefix;
    if (lo >= end) {
        if (!err) return pwritev(fd, iov, cnt, off); /* shorter than a sector: cannot be cut short */
        prefix = 0;
    } else {
        uint64_t choices = (end - 1 - lo) / 512 + 1 + (err ? 1 : 0);
        uint64_t pick = r % choices;
        prefix = (err && pick == choices - 1) ? 0 : (size_t)(lo + pick * 512 - (uint64_t)off);
    }
    if (prefix && write_prefix(fd, iov, cnt, off, prefix) < 0) return -1;
    if (!err) return (ssize_t)prefix;
    /* the sector being written when the device failed reads back as garbage */
    size_t gl = total - prefix < 512 ? total - prefix : 512;
    if (gl) {
        uint8_t junk[512];
        for (size_t i = 0; i < gl; i += 8) {
            uint64_t v = next_rand(&g);
            memcpy(junk + i, &v, gl - i < 8 ? gl - i : 8);
        }
        if (pwrite(fd, junk, gl, off + (off_t)prefix) < 0) return -1;
    }
    errno = err;
    return -1;
}

static ssize_t f_pwritev(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    int hit = image_before(BS_FAULT_OP_WRITE);
    int err = should_fail(BS_FAULT_OP_WRITE);
    ssize_t r;
    if (err && tear_mode)
        r = torn_write(fd, iov, cnt, off, tear_mode == BS_FAULT_TEAR_SHORT ? 0 : err);
    else if (err) {
        errno = err;
        r = -1;
    } else
        r = pwritev(fd, iov, cnt, off);
    int saved = errno;
    image_after(hit);
    errno = saved;
    return r;
}

static ssize_t f_preadv(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    int hit = image_before(BS_FAULT_OP_READ);
    int err = should_fail(BS_FAULT_OP_READ);
    ssize_t r;
    if (err) {
        errno = err;
        r = -1;
    } else
        r = preadv(fd, iov, cnt, off);
    int saved = errno;
    image_after(hit);
    errno = saved;
    return r;
}

static void mark_synced(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    pthread_mutex_lock(&mu);
    if (fd < MAX_FD && fd_file[fd]) files[fd_file[fd] - 1].synced_len = (uint64_t)st.st_size;
    if (fd < MAX_FD && fd_dir[fd]) {
        size_t dl = strlen(fd_dir[fd]);
        for (int i = 0; i < MAX_TRACKED; i++)
            if (files[i].path && strncmp(files[i].path, fd_dir[fd], dl) == 0 &&
                files[i].path[dl] == '/' && !strchr(files[i].path + dl + 1, '/'))
                files[i].creation_durable = 1;
    }
    pthread_mutex_unlock(&mu);
}

static int sync_op(int fd, int data_only) {
    int hit = image_before(BS_FAULT_OP_SYNC);
    int err = should_fail(BS_FAULT_OP_SYNC);
    int rc;
    if (err) {
        errno = err;
        rc = -1;
    } else {
        /* the entries a directory holds before its fsync starts are durable once it returns */
        char *canon = NULL;
        struct dent_list ents = {NULL, 0};
        int listed = strict_list_for_sync(fd, &canon, &ents);
        rc = data_only ? fdatasync(fd) : fsync(fd);
        int saved = errno;
        if (rc == 0) mark_synced(fd);
        if (listed) {
            if (rc == 0) {
                strict_dir_synced(canon, &ents);
            } else {
                for (int i = 0; i < ents.n; i++) free(ents.v[i].name);
                free(ents.v);
                free(canon);
            }
        }
        errno = saved;
    }
    int saved = errno;
    image_after(hit);
    errno = saved;
    return rc;
}

static int f_fdatasync(void *ctx, int fd) {
    (void)ctx;
    return sync_op(fd, 1);
}

static int f_fsync(void *ctx, int fd) {
    (void)ctx;
    return sync_op(fd, 0);
}

static int f_ftruncate(void *ctx, int fd, off_t len) {
    (void)ctx;
    int hit = image_before(BS_FAULT_OP_OTHER);
    int err = should_fail(BS_FAULT_OP_OTHER);
    int rc = -1;
    if (err)
        errno = err;
    else
        rc = ftruncate(fd, len);
    int saved = errno;
    pthread_mutex_lock(&mu);
    if (rc == 0 && fd < MAX_FD && fd_file[fd]) {
        tracked *t = &files[fd_file[fd] - 1];
        if (t->synced_len > (uint64_t)len) t->synced_len = (uint64_t)len;
    }
    pthread_mutex_unlock(&mu);
    image_after(hit);
    errno = saved;
    return rc;
}

static int f_close(void *ctx, int fd) {
    (void)ctx;
    pthread_mutex_lock(&mu);
    if (fd >= 0 && fd < MAX_FD) {
        fd_file[fd] = 0;
        free(fd_dir[fd]);
        fd_dir[fd] = NULL;
    }
    pthread_mutex_unlock(&mu);
    return close(fd);
}

static int f_unlink(void *ctx, const char *path) {
    (void)ctx;
    int hit = image_before(BS_FAULT_OP_OTHER);
    int err = should_fail(BS_FAULT_OP_OTHER);
    int rc = -1;
    if (err)
        errno = err;
    else {
        grave g = strict_before_unlink(path); /* keeps the inode if the unlink may be undone */
        rc = unlink(path);
        int saved_u = errno;
        strict_after_unlink(g, rc == 0);
        errno = saved_u;
    }
    int saved = errno;
    pthread_mutex_lock(&mu);
    tracked *t = find_path(path);
    if (rc == 0 && t) {
        for (int fd = 0; fd < MAX_FD; fd++)
            if (fd_file[fd] == (int)(t - files) + 1) fd_file[fd] = 0;
        free(t->path);
        t->path = NULL;
    }
    pthread_mutex_unlock(&mu);
    image_after(hit);
    errno = saved;
    return rc;
}

static off_t f_size(void *ctx, int fd) {
    (void)ctx;
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    return st.st_size;
}

static int f_advise_willneed(void *ctx, int fd, off_t off, off_t len) {
    (void)ctx;
    return posix_fadvise(fd, off, len, POSIX_FADV_WILLNEED);
}

static const bs_fileops fault_ops = {f_open,      f_pwritev, f_preadv, f_fdatasync, f_fsync,
                                     f_ftruncate, f_close,   f_unlink, f_size,      f_advise_willneed,
                                     NULL};

void bs_fault_install(void) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_TRACKED; i++) {
        free(files[i].path);
        files[i].path = NULL;
    }
    memset(fd_file, 0, sizeof fd_file);
    for (int i = 0; i < MAX_FD; i++) {
        free(fd_dir[i]);
        fd_dir[i] = NULL;
    }
    op_count = fail_at = fired = 0;
    fail_mask = fail_errno = fail_persistent = tear_mode = 0;
    image_count = image_at = image_seed = 0;
    image_mask = images_taken = 0;
    free(image_root);
    free(image_dst);
    image_root = image_dst = NULL;
    pthread_mutex_unlock(&mu);
    bs_fault_arm_image_points(0, NULL, NULL, 0, NULL, NULL);
    bs_fault_power_track(NULL, NULL);
    bs_io_set(&fault_ops);
}

void bs_fault_uninstall(void) { bs_io_set(NULL); }

void bs_fault_arm(int op_mask, uint64_t nth, int err, int persistent) {
    pthread_mutex_lock(&mu);
    fail_mask = op_mask;
    fail_at = nth;
    fail_errno = err;
    fail_persistent = persistent;
    tear_mode = 0;
    op_count = fired = 0;
    pthread_mutex_unlock(&mu);
}

void bs_fault_arm_torn(uint64_t nth, int mode, int err, uint64_t seed) {
    pthread_mutex_lock(&mu);
    fail_mask = BS_FAULT_OP_WRITE;
    fail_at = nth;
    fail_errno = err ? err : EIO; /* what a TEAR_EIO write fails with */
    fail_persistent = 0;
    tear_mode = nth ? mode : 0;
    tear_rng = seed ? seed : 0x2545f4914f6cdd1dull;
    op_count = fired = 0;
    pthread_mutex_unlock(&mu);
}

uint64_t bs_fault_op_count(void) {
    pthread_mutex_lock(&mu);
    uint64_t n = op_count;
    pthread_mutex_unlock(&mu);
    return n;
}

uint64_t bs_fault_fired(void) {
    pthread_mutex_lock(&mu);
    uint64_t n = fired;
    pthread_mutex_unlock(&mu);
    return n;
}

/* xorshift64*: deterministic tearing from a seed */
static uint64_t next_rand(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

int bs_fault_crash(uint64_t torn_seed) {
    int rc = BS_OK;
    uint64_t rng = torn_seed;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_TRACKED; i++) {
        tracked *t = &files[i];
        if (!t->path) continue;
        struct stat st;
        if (stat(t->path, &st) != 0) continue;
        if (!t->creation_durable && !torn_seed) {
            if (unlink(t->path) != 0) rc = bs_os_error(errno);
            continue;
        }
        uint64_t keep = t->synced_len;
        uint64_t size = (uint64_t)st.st_size;
        if (size <= keep) continue;
        if (torn_seed) keep += (next_rand(&rng) % ((size - keep) / 512 + 1)) * 512;
        if (keep < size && truncate(t->path, (off_t)keep) != 0) rc = bs_os_error(errno);
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

/* ---- power images ---- */

/* Copy the first `len` bytes of src into a new file dst; then, if garble_rng, overwrite the sector
 * after a torn prefix (the bytes [len, len + glen)) with garbage. */
static int copy_prefix(const char *src, const char *dst, uint64_t len, uint64_t glen, uint64_t *garble_rng) {
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return errno == ENOENT ? BS_OK : bs_os_error(errno); /* gone meanwhile: as if unlinked */
    int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        int e = errno;
        close(in);
        return bs_os_error(e);
    }
    int rc = BS_OK;
    uint8_t buf[1 << 16];
    uint64_t done = 0;
    while (done < len) {
        size_t want = len - done < sizeof buf ? (size_t)(len - done) : sizeof buf;
        ssize_t r = pread(in, buf, want, (off_t)done);
        if (r < 0) { rc = bs_os_error(errno); break; }
        if (r == 0) break; /* shorter than recorded (truncated meanwhile) */
        if (write(out, buf, (size_t)r) != r) { rc = bs_os_error(errno ? errno : EIO); break; }
        done += (uint64_t)r;
    }
    if (rc == BS_OK && glen && garble_rng) {
        for (size_t i = 0; i < glen; i += 8) {
            uint64_t v = next_rand(garble_rng);
            memcpy(buf + i, &v, glen - i < 8 ? glen - i : 8);
        }
        if (pwrite(out, buf, (size_t)glen, (off_t)done) != (ssize_t)glen) rc = bs_os_error(errno ? errno : EIO);
    }
    close(in);
    close(out);
    return rc;
}

/* Recursively write the power-loss image of directory src into dst (which must not exist). */
static int image_tree(const char *src, const char *dst, uint64_t *rng, int garble) {
    if (mkdir(dst, 0755) != 0) return bs_os_error(errno);
    DIR *d = opendir(src);
    if (!d) return bs_os_error(errno);
    int rc = BS_OK;
    struct dirent *de;
    while (rc == BS_OK && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        char s[PATH_MAX], t[PATH_MAX];
        if (snprintf(s, sizeof s, "%s/%s", src, de->d_name) >= (int)sizeof s ||
            snprintf(t, sizeof t, "%s/%s", dst, de->d_name) >= (int)sizeof t) {
            rc = BS_EINVAL;
            break;
        }
        struct stat st;
        if (lstat(s, &st) != 0) {
            if (errno == ENOENT) continue;
            rc = bs_os_error(errno);
            break;
        }
        if (S_ISDIR(st.st_mode)) {
            rc = image_tree(s, t, rng, garble);
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        uint64_t size = (uint64_t)st.st_size, keep = size, glen = 0;
        tracked *tr = find_path(s);
        if (tr) {
            if (!tr->creation_durable && (!*rng || next_rand(rng) % 2 == 0)) continue; /* never made durable */
            keep = tr->synced_len < size ? tr->synced_len : size;
            if (*rng && size > keep) {
                keep += (next_rand(rng) % ((size - keep) / 512 + 1)) * 512;
                if (keep > size) keep = size;
                if (garble && keep < size && next_rand(rng) % 2 == 0) glen = size - keep < 512 ? size - keep : 512;
            }
        }
        rc = copy_prefix(s, t, keep, glen, rng);
    }
    closedir(d);
    return rc;
}

/* ---- the strict model of directory entries ---- */

static void free_dents(struct dent_list *l) {
    for (int i = 0; i < l->n; i++) free(l->v[i].name);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int cmp_dent(const void *a, const void *b) {
    return strcmp(((const dent *)a)->name, ((const dent *)b)->name);
}

/* The entries of directory `path` (without . and ..), with their inodes, by name. 0 on success. */
static int list_dir(const char *path, struct dent_list *out) {
    out->v = NULL;
    out->n = 0;
    DIR *d = opendir(path);
    if (!d) return -1;
    int cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        int is_dir;
        if (de->d_type == DT_UNKNOWN) {
            char p[PATH_MAX];
            struct stat st;
            snprintf(p, sizeof p, "%s/%s", path, de->d_name);
            if (lstat(p, &st) != 0) continue;
            is_dir = S_ISDIR(st.st_mode);
        } else {
            is_dir = de->d_type == DT_DIR;
        }
        if (out->n == cap) {
            cap = cap ? cap * 2 : 16;
            dent *nv = realloc(out->v, (size_t)cap * sizeof *nv);
            if (!nv) break;
            out->v = nv;
        }
        out->v[out->n++] = (dent){strdup(de->d_name), de->d_ino, is_dir};
    }
    closedir(d);
    if (out->n > 1) qsort(out->v, (size_t)out->n, sizeof *out->v, cmp_dent); /* images reproducible from a seed */
    return 0;
}

static const dent *find_dent(const struct dent_list *l, const char *name) {
    for (int i = 0; l && i < l->n; i++)
        if (strcmp(l->v[i].name, name) == 0) return &l->v[i];
    return NULL;
}

static int under_root(const char *canon) {
    if (!track_root) return 0;
    size_t n = strlen(track_root);
    return strncmp(canon, track_root, n) == 0 && (canon[n] == '/' || canon[n] == '\0');
}

static dirstate *find_dir(const char *canon) {
    for (int i = 0; i < ndirs; i++)
        if (strcmp(dirs[i].path, canon) == 0) return &dirs[i];
    return NULL;
}

/* Record `ents` as the durable entries of directory `canon` (takes ownership of both). */
static void set_dir(char *canon, struct dent_list *ents) {
    dirstate *ds = find_dir(canon);
    if (ds) {
        free(canon);
        free_dents(&ds->ents);
        ds->ents = *ents;
        return;
    }
    if (ndirs == capdirs) {
        int cap = capdirs ? capdirs * 2 : 64;
        dirstate *nd = realloc(dirs, (size_t)cap * sizeof *nd);
        if (!nd) {
            free(canon);
            free_dents(ents);
            return;
        }
        dirs = nd;
        capdirs = cap;
    }
    dirs[ndirs++] = (dirstate){canon, *ents};
}

/* The baseline: every directory under `path` holds durably what it holds now. */
static void baseline_tree(const char *path) {
    struct dent_list ents;
    if (list_dir(path, &ents) != 0) return;
    for (int i = 0; i < ents.n; i++) {
        if (!ents.v[i].is_dir) continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", path, ents.v[i].name) >= (int)sizeof p) continue;
        if (shadow_root && strcmp(p, shadow_root) == 0) continue;
        baseline_tree(p);
    }
    set_dir(strdup(path), &ents);
}

/* Before a directory fsync: list the directory if it is tracked. 1 if listed (canon, out filled). */
static int strict_list_for_sync(int fd, char **canon_out, struct dent_list *out) {
    pthread_mutex_lock(&mu);
    char *dpath = (track_root && fd >= 0 && fd < MAX_FD && fd_dir[fd]) ? strdup(fd_dir[fd]) : NULL;
    pthread_mutex_unlock(&mu);
    if (!dpath) return 0;
    char canon[PATH_MAX];
    int ok = realpath(dpath, canon) != NULL;
    free(dpath);
    pthread_mutex_lock(&mu);
    ok = ok && under_root(canon);
    pthread_mutex_unlock(&mu);
    if (!ok || list_dir(canon, out) != 0) return 0;
    *canon_out = strdup(canon);
    return 1;
}

/* After a directory fsync: its entries are durable; unlinks of names no longer there are too. */
static void strict_dir_synced(char *canon, struct dent_list *ents) {
    pthread_mutex_lock(&mu);
    size_t cl = strlen(canon);
    for (int i = 0; i < ngraves;) {
        grave *g = &graves[i];
        const char *base = g->path + cl + 1;
        if (strncmp(g->path, canon, cl) == 0 && g->path[cl] == '/' && !strchr(base, '/')) {
            const dent *e = find_dent(ents, base);
            if (!e || e->ino != g->ino) {
                unlink(g->shadow);
                free(g->path);
                free(g->shadow);
                graves[i] = graves[--ngraves];
                continue;
            }
        }
        i++;
    }
    set_dir(canon, ents);
    pthread_mutex_unlock(&mu);
}

static int canon_of_file(const char *path, char out[PATH_MAX]) {
    char dir[PATH_MAX], rd[PATH_MAX];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) return -1;
    char *slash = strrchr(dir, '/');
    const char *base = path;
    if (slash) {
        *slash = '\0';
        base = path + (slash - dir) + 1;
        if (!realpath(dir[0] ? dir : "/", rd)) return -1;
    } else if (!realpath(".", rd)) {
        return -1;
    }
    return snprintf(out, PATH_MAX, "%s/%s", rd, base) >= PATH_MAX ? -1 : 0;
}

/* Before an unlink under the tracked root: if the name is durable, keep its inode alive (a hard link
 * in the shadow directory) so that an image can bring it back until its directory is synced. */
static grave strict_before_unlink(const char *path) {
    grave g = {NULL, NULL, 0, 0};
    char canon[PATH_MAX];
    pthread_mutex_lock(&mu);
    int active = track_root && shadow_root;
    pthread_mutex_unlock(&mu);
    if (!active || canon_of_file(path, canon) != 0) return g;
    struct stat st;
    if (lstat(canon, &st) != 0 || !S_ISREG(st.st_mode)) return g;
    pthread_mutex_lock(&mu);
    char *slash = strrchr(canon, '/');
    *slash = '\0';
    dirstate *ds = under_root(canon) ? find_dir(canon) : NULL;
    const dent *e = ds ? find_dent(&ds->ents, slash + 1) : NULL;
    *slash = '/';
    if (e && e->ino == st.st_ino) {
        char sh[PATH_MAX];
        snprintf(sh, sizeof sh, "%s/g%llu", shadow_root, (unsigned long long)++shadow_seq);
        tracked *t = find_path(path);
        if (!t) t = find_path(canon);
        if (link(canon, sh) == 0)
            g = (grave){strdup(canon), strdup(sh), st.st_ino, t ? t->synced_len : (uint64_t)st.st_size};
    }
    pthread_mutex_unlock(&mu);
    return g;
}

static void strict_after_unlink(grave g, int ok) {
    if (!g.path) return;
    pthread_mutex_lock(&mu);
    if (ok && ngraves == capgraves) {
        int cap = capgraves ? capgraves * 2 : 64;
        grave *ng = realloc(graves, (size_t)cap * sizeof *ng);
        if (ng) {
            graves = ng;
            capgraves = cap;
        }
    }
    if (ok && ngraves < capgraves) {
        graves[ngraves++] = g;
    } else {
        unlink(g.shadow);
        free(g.path);
        free(g.shadow);
    }
    pthread_mutex_unlock(&mu);
}

/* Every unlink in this layer removes one of its own shadow hard links (under shadow_root, made by
   this file to model an undone unlink or a snapshot): never a file of the store under test, whose
   names it only reads. The store's data stays reachable through its own name. */
static void free_snapdir(snapdir *sd, int unlink_shadows) {
    for (int i = 0; i < sd->n; i++) {
        if (unlink_shadows) unlink(sd->files[i].shadow);
        free(sd->files[i].name);
        free(sd->files[i].shadow);
    }
    free(sd->files);
    sd->files = NULL;
    sd->n = 0;
}

static snapdir *find_snap(const char *canon) {
    for (int i = 0; i < nsnaps; i++)
        if (strcmp(snaps[i].path, canon) == 0) return &snaps[i];
    return NULL;
}

static void strict_reset(void) {
    for (int i = 0; i < ndirs; i++) {
        free(dirs[i].path);
        free_dents(&dirs[i].ents);
    }
    free(dirs);
    dirs = NULL;
    ndirs = capdirs = 0;
    for (int i = 0; i < ngraves; i++) {
        unlink(graves[i].shadow);
        free(graves[i].path);
        free(graves[i].shadow);
    }
    free(graves);
    graves = NULL;
    ngraves = capgraves = 0;
    for (int i = 0; i < nsnaps; i++) {
        free_snapdir(&snaps[i], 1);
        free(snaps[i].path);
    }
    free(snaps);
    snaps = NULL;
    nsnaps = capsnaps = 0;
    free(track_root);
    free(shadow_root);
    track_root = shadow_root = NULL;
    shadow_seq = unmodelled = 0;
}

int bs_fault_power_track(const char *root, const char *shadow) {
    pthread_mutex_lock(&mu);
    strict_reset();
    int rc = BS_OK;
    if (root && shadow) {
        char r[PATH_MAX], sh[PATH_MAX];
        if (!realpath(root, r) || !realpath(shadow, sh)) {
            rc = bs_os_error(errno);
        } else if (strncmp(sh, r, strlen(r)) == 0 && (sh[strlen(r)] == '/' || sh[strlen(r)] == '\0')) {
            rc = BS_EINVAL; /* the shadow directory must lie outside the root */
        } else {
            track_root = strdup(r);
            shadow_root = strdup(sh);
            baseline_tree(track_root);
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

static int64_t log_number(const char *name) {
    size_t n = strlen(name);
    if (n < 5 || strcmp(name + n - 4, ".log") != 0) return -1;
    int64_t v = 0;
    for (size_t i = 0; i < n - 4; i++) {
        if (name[i] < '0' || name[i] > '9') return -1;
        v = v * 10 + (name[i] - '0');
    }
    return v;
}

/* RocksDB's files in the order their consistency needs: CURRENT, its MANIFEST and the WALs first, so
 * that an SST the captured MANIFEST names was complete before it was captured. */
static int snap_rank(const char *name) {
    if (strcmp(name, "CURRENT") == 0) return 0;
    if (strncmp(name, "MANIFEST-", 9) == 0) return 1;
    if (log_number(name) >= 0) return 2;
    return 3;
}

int bs_fault_power_snapshot(const char *dir) {
    char canon[PATH_MAX];
    if (!realpath(dir, canon) && (errno != ENOENT || canon_of_file(dir, canon) != 0)) return bs_os_error(errno);
    pthread_mutex_lock(&mu);
    if (!track_root || !shadow_root || !under_root(canon)) {
        pthread_mutex_unlock(&mu);
        return BS_OK;
    }
    struct dent_list ents = {NULL, 0};
    if (list_dir(canon, &ents) != 0 && errno != ENOENT) { /* not made yet: durable as empty */
        int e = errno;
        pthread_mutex_unlock(&mu);
        return bs_os_error(e);
    }
    snapdir *sd = find_snap(canon);
    if (!sd) {
        if (nsnaps == capsnaps) {
            int cap = capsnaps ? capsnaps * 2 : 8;
            snapdir *ns = realloc(snaps, (size_t)cap * sizeof *ns);
            if (!ns) {
                free_dents(&ents);
                pthread_mutex_unlock(&mu);
                return BS_ENOMEM;
            }
            snaps = ns;
            capsnaps = cap;
        }
        sd = &snaps[nsnaps++];
        *sd = (snapdir){strdup(canon), NULL, 0};
    }
    snapfile *nf = calloc((size_t)ents.n + 1, sizeof *nf);
    int nn = 0;
    for (int rank = 0; nf && rank < 4; rank++) {
        for (int i = 0; i < ents.n; i++) {
            const char *name = ents.v[i].name;
            if (ents.v[i].is_dir || snap_rank(name) != rank || strncmp(name, "LOG", 3) == 0) continue;
            char p[PATH_MAX];
            snprintf(p, sizeof p, "%s/%s", canon, name);
            struct stat st;
            if (lstat(p, &st) != 0 || !S_ISREG(st.st_mode)) continue; /* deleted meanwhile */
            snapfile *old = NULL;
            for (int j = 0; j < sd->n; j++)
                if (sd->files[j].shadow && sd->files[j].ino == st.st_ino && strcmp(sd->files[j].name, name) == 0)
                    old = &sd->files[j];
            if (old) { /* the same file: its link is reused, its size is the one durable now */
                nf[nn++] = (snapfile){old->name, old->shadow, st.st_ino, (uint64_t)st.st_size, log_number(name)};
                old->name = old->shadow = NULL;
                continue;
            }
            char sh[PATH_MAX];
            snprintf(sh, sizeof sh, "%s/r%llu", shadow_root, (unsigned long long)++shadow_seq);
            if (link(p, sh) != 0) continue;
            nf[nn++] = (snapfile){strdup(name), strdup(sh), st.st_ino, (uint64_t)st.st_size, log_number(name)};
        }
    }
    for (int j = 0; j < sd->n; j++)
        if (sd->files[j].shadow) unlink(sd->files[j].shadow);
    free_snapdir(sd, 0);
    sd->files = nf;
    sd->n = nn;
    free_dents(&ents);
    pthread_mutex_unlock(&mu);
    return BS_OK;
}

uint64_t bs_fault_power_unmodelled(void) {
    pthread_mutex_lock(&mu);
    uint64_t n = unmodelled;
    pthread_mutex_unlock(&mu);
    return n;
}

/* The kept length of a file of `size` bytes synced up to `synced`; with rng, a torn tail: a random
 * number of the unsynced sectors (by file offset), and maybe a garbage sector after them. */
static uint64_t torn_keep(uint64_t synced, uint64_t size, uint64_t *rng, int garble, uint64_t *glen) {
    uint64_t keep = synced < size ? synced : size;
    *glen = 0;
    if (*rng && size > keep) {
        keep += (next_rand(rng) % ((size - keep) / 512 + 1)) * 512;
        if (keep > size) keep = size;
        if (garble && keep < size && next_rand(rng) % 2 == 0) *glen = size - keep < 512 ? size - keep : 512;
    }
    return keep;
}

static int image_strict(const char *src, const char *dst, uint64_t *rng, int garble);

static int image_snapdir(const snapdir *sd, const char *dst, uint64_t *rng) {
    int64_t newest = -1;
    for (int i = 0; i < sd->n; i++)
        if (sd->files[i].log_no > newest) newest = sd->files[i].log_no;
    int rc = BS_OK;
    for (int i = 0; rc == BS_OK && i < sd->n; i++) {
        const snapfile *f = &sd->files[i];
        uint64_t keep = f->size;
        struct stat st;
        if (*rng && newest >= 0 && f->log_no == newest && stat(f->shadow, &st) == 0 && (uint64_t)st.st_size > keep) {
            /* RocksDB's unsynced WAL tail: a random part of it reached the disk (never garbage: the WAL
             * is RocksDB's to verify) */
            uint64_t glen;
            keep = torn_keep(keep, (uint64_t)st.st_size, rng, 0, &glen);
        }
        char t[PATH_MAX];
        snprintf(t, sizeof t, "%s/%s", dst, f->name);
        rc = copy_prefix(f->shadow, t, keep, 0, NULL);
    }
    return rc;
}

/* Copy the live entry s (a directory: recursively) into t. */
static int image_live(const char *s, const char *t, uint64_t *rng, int garble) {
    struct stat st;
    if (lstat(s, &st) != 0) return BS_OK; /* gone meanwhile */
    if (S_ISDIR(st.st_mode)) return image_strict(s, t, rng, garble);
    if (!S_ISREG(st.st_mode)) return BS_OK;
    uint64_t size = (uint64_t)st.st_size, keep = size, glen = 0;
    tracked *tr = find_path(s);
    if (tr) keep = torn_keep(tr->synced_len, size, rng, garble, &glen);
    return copy_prefix(s, t, keep, glen, rng);
}

static grave *find_grave(const char *path, ino_t ino) {
    for (int i = 0; i < ngraves; i++)
        if (graves[i].ino == ino && strcmp(graves[i].path, path) == 0) return &graves[i];
    return NULL;
}

static int image_strict(const char *src, const char *dst, uint64_t *rng, int garble) {
    if (mkdir(dst, 0755) != 0) return bs_os_error(errno);
    const snapdir *sd = find_snap(src);
    if (sd) return image_snapdir(sd, dst, rng);
    const dirstate *ds = find_dir(src);
    struct dent_list cur;
    if (list_dir(src, &cur) != 0) cur.n = 0, cur.v = NULL;
    int rc = BS_OK;
    for (int i = 0; rc == BS_OK && ds && i < ds->ents.n; i++) {
        const dent *e = &ds->ents.v[i];
        char s[PATH_MAX], t[PATH_MAX];
        if (snprintf(s, sizeof s, "%s/%s", src, e->name) >= (int)sizeof s ||
            snprintf(t, sizeof t, "%s/%s", dst, e->name) >= (int)sizeof t) {
            rc = BS_EINVAL;
            break;
        }
        const dent *c = find_dent(&cur, e->name);
        if (c && c->ino == e->ino) {
            rc = image_live(s, t, rng, garble);
            continue;
        }
        /* unlinked (or replaced) since the directory's last fsync: undone, or (torn) maybe not */
        if (*rng && next_rand(rng) % 2 == 0) {
            if (c) rc = image_live(s, t, rng, garble);
            continue;
        }
        grave *g = find_grave(s, e->ino);
        if (g) {
            struct stat st;
            uint64_t size = stat(g->shadow, &st) == 0 ? (uint64_t)st.st_size : 0, glen = 0;
            uint64_t keep = torn_keep(g->synced_len, size, rng, garble, &glen);
            rc = copy_prefix(g->shadow, t, keep, glen, rng);
        } else {
            unmodelled++;
            if (c) rc = image_live(s, t, rng, garble);
        }
    }
    for (int i = 0; rc == BS_OK && i < cur.n; i++) {
        const dent *c = &cur.v[i];
        if (ds && find_dent(&ds->ents, c->name)) continue;
        /* made since the directory's last fsync: lost, or (torn) maybe not */
        if (!*rng || next_rand(rng) % 2) continue;
        char s[PATH_MAX], t[PATH_MAX];
        if (snprintf(s, sizeof s, "%s/%s", src, c->name) >= (int)sizeof s ||
            snprintf(t, sizeof t, "%s/%s", dst, c->name) >= (int)sizeof t) {
            rc = BS_EINVAL;
            break;
        }
        rc = image_live(s, t, rng, garble);
    }
    free_dents(&cur);
    return rc;
}

static int power_image_locked(const char *root, const char *dst, uint64_t torn_seed, int garble) {
    uint64_t rng = torn_seed;
    char canon[PATH_MAX];
    if (track_root && realpath(root, canon) && under_root(canon)) return image_strict(canon, dst, &rng, garble);
    return image_tree(root, dst, &rng, garble);
}

int bs_fault_power_image(const char *root, const char *dst, uint64_t torn_seed) {
    pthread_mutex_lock(&mu);
    int rc = power_image_locked(root, dst, torn_seed, torn_seed != 0);
    pthread_mutex_unlock(&mu);
    return rc;
}

void bs_fault_arm_images(int op_mask, uint64_t nth, const char *root, const char *dst, uint64_t torn_seed) {
    pthread_mutex_lock(&mu);
    free(image_root);
    free(image_dst);
    image_root = nth ? strdup(root) : NULL;
    image_dst = nth ? strdup(dst) : NULL;
    image_mask = op_mask;
    image_at = (image_root && image_dst) ? nth : 0;
    image_seed = torn_seed;
    image_count = 0;
    images_taken = 0;
    pthread_mutex_unlock(&mu);
}

int bs_fault_images_taken(void) {
    pthread_mutex_lock(&mu);
    int n = images_taken;
    pthread_mutex_unlock(&mu);
    return n;
}

uint64_t bs_fault_image_op_count(void) {
    pthread_mutex_lock(&mu);
    uint64_t n = image_count;
    pthread_mutex_unlock(&mu);
    return n;
}

void bs_fault_arm_image_points(int op_mask, const uint64_t *points, const uint64_t *seeds, int n, const char *root,
                               const char *dst) {
    pthread_mutex_lock(&mu);
    free(pt_at);
    free(pt_seed);
    free(pt_root);
    free(pt_dst);
    pt_at = pt_seed = NULL;
    pt_root = pt_dst = NULL;
    pt_n = pt_next = 0;
    if (n > 0 && points && root && dst) {
        pt_at = malloc((size_t)n * sizeof *pt_at);
        pt_seed = calloc((size_t)n, sizeof *pt_seed);
        if (pt_at && pt_seed) {
            memcpy(pt_at, points, (size_t)n * sizeof *pt_at);
            if (seeds) memcpy(pt_seed, seeds, (size_t)n * sizeof *pt_seed);
            pt_n = n;
            pt_root = strdup(root);
            pt_dst = strdup(dst);
        }
    }
    image_mask = op_mask;
    image_at = 0; /* the single-point images of bs_fault_arm_images are disarmed */
    image_count = 0;
    images_taken = 0;
    pthread_mutex_unlock(&mu);
}
