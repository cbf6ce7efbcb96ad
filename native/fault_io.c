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
 * Only appends are modelled (blockstore never overwrites synced bytes), which is why a file's
 * unsynced state is fully described by one length.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
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
static uint64_t op_count, fail_at;
static int fail_mask, fail_errno, fail_persistent;

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
    } else if (!fail_mask) {
        op_count++;
    }
    pthread_mutex_unlock(&mu);
    return err;
}

static int f_open(void *ctx, const char *path, int flags, int mode) {
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

static ssize_t f_pwritev(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_WRITE);
    if (err) { errno = err; return -1; }
    return pwritev(fd, iov, cnt, off);
}

static ssize_t f_preadv(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_READ);
    if (err) { errno = err; return -1; }
    return preadv(fd, iov, cnt, off);
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

static int f_fdatasync(void *ctx, int fd) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_SYNC);
    if (err) { errno = err; return -1; }
    int rc = fdatasync(fd);
    if (rc == 0) mark_synced(fd);
    return rc;
}

static int f_fsync(void *ctx, int fd) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_SYNC);
    if (err) { errno = err; return -1; }
    int rc = fsync(fd);
    if (rc == 0) mark_synced(fd);
    return rc;
}

static int f_ftruncate(void *ctx, int fd, off_t len) {
    (void)ctx;
    int err = should_fail(BS_FAULT_OP_OTHER);
    if (err) { errno = err; return -1; }
    int rc = ftruncate(fd, len);
    pthread_mutex_lock(&mu);
    if (rc == 0 && fd < MAX_FD && fd_file[fd]) {
        tracked *t = &files[fd_file[fd] - 1];
        if (t->synced_len > (uint64_t)len) t->synced_len = (uint64_t)len;
    }
    pthread_mutex_unlock(&mu);
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
    int err = should_fail(BS_FAULT_OP_OTHER);
    if (err) { errno = err; return -1; }
    int rc = unlink(path);
    pthread_mutex_lock(&mu);
    tracked *t = find_path(path);
    if (rc == 0 && t) {
        for (int fd = 0; fd < MAX_FD; fd++)
            if (fd_file[fd] == (int)(t - files) + 1) fd_file[fd] = 0;
        free(t->path);
        t->path = NULL;
    }
    pthread_mutex_unlock(&mu);
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
    op_count = fail_at = 0;
    fail_mask = fail_errno = fail_persistent = 0;
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
    op_count = 0;
    pthread_mutex_unlock(&mu);
}

uint64_t bs_fault_op_count(void) {
    pthread_mutex_lock(&mu);
    uint64_t n = op_count;
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
