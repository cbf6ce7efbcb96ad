/* Reads of records spread over several files in one call: what a caller that needs one set of records
 * from many blocks at once (a layer of every chunk of a blended prompt) uses, so that it crosses into C
 * once, and runs no Python (and needs no GIL) between one file's reads and the next. */
#include "blockstore.h"

int bs_read_files(const int *fds, const size_t *counts, size_t files, bs_read_item *items, uint64_t max_gap,
                  int flags) {
    size_t at = 0;
    for (size_t f = 0; f < files; f++) {
        int rc = bs_read_many(fds[f], items + at, counts[f], max_gap, flags);
        if (rc != BS_OK) return rc; /* the rest unread: the caller fails the whole read */
        at += counts[f];
    }
    return BS_OK;
}
