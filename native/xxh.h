/* The system xxHash, with XXH3 routed to its runtime CPU dispatch on x86-64: Debian's libxxhash
 * default entry points are its SSE2 build (16 GB/s here); the dispatching ones pick AVX2 when the
 * CPU has it (43 GB/s), with identical hash values. */
#ifndef BLOCKSTORE_XXH_H
#define BLOCKSTORE_XXH_H

#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>
#if defined(__x86_64__)
#include <xxh_x86dispatch.h>
#endif

#endif
