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
 * unsynced state is fully described by one length. Not modelled: an unlink or a truncation undone
 * by a power loss before its directory or file was synced.
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

static uint64_t next_rand(uint64_t *s);
static int power_image_locked(const char *root, const char *dst, uint64_t torn_seed, int garble);

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
    if ((kind & image_mask) && ++image_count == image_at && image_root && image_dst) {
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
        rc = data_only ? fdatasync(fd) : fsync(fd);
        if (rc == 0) mark_synced(fd);
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
    else
        rc = unlink(path);
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

static int power_image_locked(const char *root, const char *dst, uint64_t torn_seed, int garble) {
    uint64_t rng = torn_seed;
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
