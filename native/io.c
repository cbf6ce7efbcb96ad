/* The one seam every file operation of the core goes through (tests swap in native/fault_io.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockstore.h"
#include "internal.h"

static __thread int last_errno;

int bs_last_errno(void) { return last_errno; }

int bs_os_error(int err) {
    last_errno = err;
    if (err == ENOSPC || err == EDQUOT) return BS_ENOSPC;
    if (err == ENOENT) return BS_ENOENT;
    if (err == ENOMEM) return BS_ENOMEM;
    if (err == EINVAL) return BS_EINVAL;
    return BS_EIO;
}

static int os_open(void *ctx, const char *path, int flags, int mode) {
    (void)ctx;
    return open(path, flags, mode);
}
static ssize_t os_pwritev(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    return pwritev(fd, iov, cnt, off);
}
static ssize_t os_preadv(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    return preadv(fd, iov, cnt, off);
}
static int os_fdatasync(void *ctx, int fd) { (void)ctx; return fdatasync(fd); }
static int os_fsync(void *ctx, int fd) { (void)ctx; return fsync(fd); }
static int os_ftruncate(void *ctx, int fd, off_t len) { (void)ctx; return ftruncate(fd, len); }
static int os_close(void *ctx, int fd) { (void)ctx; return close(fd); }
static int os_unlink(void *ctx, const char *path) { (void)ctx; return unlink(path); }
static off_t os_size(void *ctx, int fd) {
    (void)ctx;
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    return st.st_size;
}

static int os_advise_willneed(void *ctx, int fd, off_t off, off_t len) {
    (void)ctx;
    return posix_fadvise(fd, off, len, POSIX_FADV_WILLNEED);
}

const bs_fileops bs_os_fileops = {os_open,      os_pwritev, os_preadv, os_fdatasync, os_fsync,
                                  os_ftruncate, os_close,   os_unlink, os_size,      os_advise_willneed,
                                  NULL};
const bs_fileops *bs_io = &bs_os_fileops;

void bs_io_set(const bs_fileops *ops) { bs_io = ops ? ops : &bs_os_fileops; }

int bs_file_open(const char *path, int create, int *fd_out) {
    int fd = bs_io->open(bs_io->ctx, path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
    if (fd < 0) return bs_os_error(errno);
    *fd_out = fd;
    return BS_OK;
}

int bs_file_open_ro(const char *path, int *fd_out) {
    int fd = bs_io->open(bs_io->ctx, path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return bs_os_error(errno);
    *fd_out = fd;
    return BS_OK;
}

int bs_file_close(int fd) { return bs_io->close(bs_io->ctx, fd) == 0 ? BS_OK : bs_os_error(errno); }

int bs_file_sync(int fd) {
    return bs_io->fdatasync(bs_io->ctx, fd) == 0 ? BS_OK : bs_os_error(errno);
}

int bs_dir_sync(const char *path) {
    int fd = bs_io->open(bs_io->ctx, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (fd < 0) return bs_os_error(errno);
    int rc = bs_io->fsync(bs_io->ctx, fd) == 0 ? BS_OK : bs_os_error(errno);
    bs_io->close(bs_io->ctx, fd);
    return rc;
}

int bs_file_truncate(int fd, uint64_t len) {
    return bs_io->ftruncate(bs_io->ctx, fd, (off_t)len) == 0 ? BS_OK : bs_os_error(errno);
}

int bs_file_unlink(const char *path) {
    return bs_io->unlink(bs_io->ctx, path) == 0 ? BS_OK : bs_os_error(errno);
}

int bs_file_size(int fd, uint64_t *size_out) {
    off_t s = bs_io->size(bs_io->ctx, fd);
    if (s < 0) return bs_os_error(errno);
    *size_out = (uint64_t)s;
    return BS_OK;
}

int bs_file_pread(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *got) {
    size_t done = 0;
    while (done < len) {
        struct iovec iov = {buf + done, len - done};
        ssize_t r = bs_io->preadv(bs_io->ctx, fd, &iov, 1, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return bs_os_error(errno);
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    return BS_OK;
}

int bs_file_pwrite(int fd, const uint8_t *buf, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
        struct iovec iov = {(void *)(buf + done), len - done};
        ssize_t r = bs_io->pwritev(bs_io->ctx, fd, &iov, 1, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return bs_os_error(errno);
        }
        if (r == 0) return bs_os_error(EIO);
        done += (size_t)r;
    }
    return BS_OK;
}

int bs_fadvise_dontneed(int fd) {
    int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    return rc == 0 ? BS_OK : bs_os_error(rc);
}
