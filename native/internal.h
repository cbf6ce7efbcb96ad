/* Shared between the core's own sources; not part of the API. */
#ifndef BLOCKSTORE_INTERNAL_H
#define BLOCKSTORE_INTERNAL_H

#include "blockstore.h"

extern const bs_fileops *bs_io;
extern const bs_fileops bs_os_fileops;

/* Map an errno to a BS_E* code and remember it for bs_last_errno(). */
int bs_os_error(int err);

#endif
