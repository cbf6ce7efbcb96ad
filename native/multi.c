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

/* Announce one file's items (sorted by offset) as the runs bs_read_many reads them in: neighbours closer
 * than max_gap make one range, so the device gets one large request per run. One announcement per record
 * made a cold multi-block get_many ~15 % slower than a read_many per block (SWE-shaped requests of ~9
 * records of 8-32 KiB: p50 0.93 vs 0.83 ms); by run, all files at once, it is ~25 % faster (0.63 ms).
 * A run whose first and last records' first pages are both cached is left out (a warm run: the
 * announcement would only cost a syscall). Whether one record is cached says little of the others: a
 * block whose first requested record was read lately and whose others are cold was not announced at all
 * when only a file's first record was asked (a get_many then read its blocks one after another). */
static void announce_runs(int fd, const bs_read_item *items, size_t n, uint64_t max_gap) {
    for (size_t first = 0, last; first < n; first = last + 1) {
        last = first;
        while (last + 1 < n && items[last + 1].offset >= items[last].offset + items[last].len &&
               items[last + 1].offset - (items[last].offset + items[last].len) <= max_gap)
            last++;
        if (!cached(fd, &items[first]) || (last != first && !cached(fd, &items[last])))
            bs_io->advise_willneed(bs_io->ctx, fd, (off_t)items[first].offset,
                                   (off_t)(items[last].offset + items[last].len - items[first].offset));
    }
}

void bs_announce_files(const int *fds, const size_t *counts, size_t files, const bs_read_item *items,
                       uint64_t max_gap) {
    for (size_t f = 0, at = 0; f < files; at += counts[f++]) announce_runs(fds[f], items + at, counts[f], max_gap);
}

int bs_read_files(const int *fds, const size_t *counts, size_t files, bs_read_item *items, uint64_t max_gap,
                  int flags) {
    /* With BS_READ_WILLNEED, every run of every file that is not cached is announced before the first
     * read, so a cold read has all of them in flight at once (one file at a time would keep one in
     * flight); a cached run gets no announcement (a warm read: it would only cost syscalls). A warm read
     * asks once or twice a run, not once a file: a file's first and last records cached said nothing of
     * the runs between (the kernel's readahead after a recent read caches a block's tail as often as not),
     * and one cached 1-byte RWF_NOWAIT preadv2 costs ~0.6 us here (a warm blend's layer read: a run a chunk). */
    if (flags & BS_READ_WILLNEED) bs_announce_files(fds, counts, files, items, max_gap);
    size_t at = 0;
    for (size_t f = 0; f < files; f++) {
        int rc = bs_read_many(fds[f], items + at, counts[f], max_gap, flags & ~BS_READ_WILLNEED);
        if (rc != BS_OK) return rc; /* the rest unread: the caller fails the whole read */
        at += counts[f];
    }
    return BS_OK;
}
