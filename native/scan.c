/* Record-by-record scan of a block file, used by recovery (unsealed blocks) and fsck. */
#include <stdlib.h>
#include <string.h>
#include "xxh.h"

#include "blockstore.h"
#include "internal.h"

#define HEAD_MAX (BS_RECORD_HEADER_SIZE + BS_MAX_KEY + BS_MAX_META)
#define PAYLOAD_CHUNK (1u << 20)

static const uint8_t FOOTER_MAGIC[8] = {'B', 'S', 'F', 'O', 'O', 'T', 'E', 'R'};

/* Stream the payload through xxh3 in bounded memory: returns BS_OK, BS_ECHECKSUM, or an I/O code. */
static int verify_payload(int fd, uint64_t off, uint64_t len, uint64_t expect, uint8_t *buf) {
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    while (len) {
        size_t want = len < PAYLOAD_CHUNK ? (size_t)len : PAYLOAD_CHUNK, got = 0;
        int rc = bs_file_pread(fd, buf, want, off, &got);
        if (rc) return rc;
        if (got < want) return BS_ETRUNCATED;
        XXH3_64bits_update(&st, buf, got);
        off += got;
        len -= got;
    }
    return XXH3_64bits_digest(&st) == expect ? BS_OK : BS_ECHECKSUM;
}

int bs_scan_block(int fd, uint64_t start, uint64_t end, int flags, bs_scan_entry *entries,
                  size_t cap, uint8_t *arena, size_t arena_len, size_t *n_out, uint64_t *next_out,
                  int *stop_out) {
    if (start % 8 || start > end) return BS_EINVAL;
    uint8_t *head = malloc(HEAD_MAX);
    uint8_t *pbuf = (flags & BS_SCAN_VERIFY_PAYLOAD) ? malloc(PAYLOAD_CHUNK) : NULL;
    if (!head || ((flags & BS_SCAN_VERIFY_PAYLOAD) && !pbuf)) {
        free(head);
        free(pbuf);
        return BS_ENOMEM;
    }
    size_t n = 0, arena_used = 0;
    uint64_t off = start;
    int stop = BS_SCAN_END, rc = BS_OK;
    while (off < end) {
        if (n == cap) {
            stop = BS_SCAN_MORE;
            break;
        }
        size_t got = 0;
        uint64_t avail = end - off;
        size_t want = avail < HEAD_MAX ? (size_t)avail : HEAD_MAX;
        rc = bs_file_pread(fd, head, want, off, &got);
        if (rc) break;
        if (got >= 8 && memcmp(head, FOOTER_MAGIC, 8) == 0) {
            break; /* a footer: the records end here; the caller checks it against `end` */
        }
        bs_record_info info;
        int drc = bs_record_decode(head, got, &info);
        if (drc != BS_OK || info.record_len > end - off) {
            stop = BS_SCAN_INVALID;
            break;
        }
        size_t km = info.key_len + info.meta_len;
        if (arena_len - arena_used < km) {
            if (n == 0) rc = BS_EINVAL; /* arena cannot hold even one record's key and meta */
            else stop = BS_SCAN_MORE;
            break;
        }
        int pstatus = 1;
        if (flags & BS_SCAN_VERIFY_PAYLOAD) {
            pstatus = verify_payload(fd, off + info.payload_off, info.payload_len, info.payload_xxh3, pbuf);
            if (pstatus != BS_OK && pstatus != BS_ECHECKSUM && pstatus != BS_ETRUNCATED) {
                rc = pstatus;
                break;
            }
        }
        memcpy(arena + arena_used, head + BS_RECORD_HEADER_SIZE, km);
        entries[n] = (bs_scan_entry){off, info, arena_used, pstatus};
        arena_used += km;
        n++;
        off += info.record_len;
    }
    free(head);
    free(pbuf);
    if (rc) return rc;
    *n_out = n;
    *next_out = off;
    *stop_out = stop;
    return BS_OK;
}
