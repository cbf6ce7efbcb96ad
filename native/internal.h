/* Shared between the core's own sources; not part of the API. */
#ifndef BLOCKSTORE_INTERNAL_H
#define BLOCKSTORE_INTERNAL_H

#include "blockstore.h"

extern const bs_fileops *bs_io;
extern const bs_fileops bs_os_fileops;

/* Map an errno to a BS_E* code and remember it for bs_last_errno(). */
int bs_os_error(int err);

/* Announce (readahead) the runs of several files' items, sorted by offset per file, that are not cached:
 * what bs_read_files does first with BS_READ_WILLNEED (multi.c); the layer readers announce ahead of
 * their reads with it (layers.c). */
void bs_announce_files(const int *fds, const size_t *counts, size_t files, const bs_read_item *items,
                       uint64_t max_gap);

/* bs_read_many's flag for callers that run one reader per core (the blend's layer readers): verify each
 * piece as it is read, on the reading thread, instead of on a helper thread after the read (batch.c). */
#define BS_READ_VERIFY_INLINE 4

#endif
