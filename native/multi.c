/* Reads of records spread over several files in one call: what a caller that needs one set of records
 * from many blocks at once (a layer of every chunk of a blended prompt) uses, so that it crosses into C
 * once, and runs no Python (and needs no GIL) between one file's reads and the next. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/uio.h>

#include "blockstore.h"
#include "internal.h"

/* Whether the first page of the item is in the page cache: a one-byte read that may not wait for the
 * disk (RWF_NOWAIT). Anything but a byte read says "not cached" (EAGAIN, or a kernel without the flag),
 * which only costs an announcement the caller asked for anyway. */
static int cached(int fd, const bs_read_item *it) {
#ifdef RWF_NOWAIT
    uint8_t byte;
    struct iovec iov = {&byte, 1};
    return preadv2(fd, &iov, 1, (off_t)it->offset, RWF_NOWAIT) == 1;
#else
    (void)fd;
    (void)it;
    return 0;
#endif
}

int bs_read_files(const int *fds, const size_t *counts, size_t files, bs_read_item *items, uint64_t max_gap,
                  int flags) {
    /* With BS_READ_WILLNEED, every record of every file whose first record is not cached is announced
     * before the first read, so a cold read has all of them in flight at once (one file at a time would
     * keep one in flight); a file whose pages are cached gets no announcement (a warm read: it would
     * only cost syscalls). */
    if (flags & BS_READ_WILLNEED)
        for (size_t f = 0, at = 0; f < files; at += counts[f++])
            if (counts[f] && !cached(fds[f], &items[at]))
                for (size_t i = at; i < at + counts[f]; i++)
                    bs_io->advise_willneed(bs_io->ctx, fds[f], (off_t)items[i].offset, (off_t)items[i].len);
    size_t at = 0;
    for (size_t f = 0; f < files; f++) {
        int rc = bs_read_many(fds[f], items + at, counts[f], max_gap, flags & ~BS_READ_WILLNEED);
        if (rc != BS_OK) return rc; /* the rest unread: the caller fails the whole read */
        at += counts[f];
    }
    return BS_OK;
}
