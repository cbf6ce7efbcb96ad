/* Record headers, block headers and footers: encoding and verification (docs/format.md §2). */
#include "xxh.h"
#include <string.h>

#include "blockstore.h"

static const uint8_t RECORD_MAGIC[4] = {'B', 'S', 'R', '1'};
static const uint8_t BLOCK_MAGIC[8] = {'B', 'S', 'B', 'L', 'O', 'C', 'K', 0};
static const uint8_t FOOTER_MAGIC[8] = {'B', 'S', 'F', 'O', 'O', 'T', 'E', 'R'};

/* Explicit little-endian accessors: the format is LE whatever the host is. */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

uint64_t bs_xxh3(const uint8_t *buf, size_t len) { return XXH3_64bits(buf, len); }

void bs_xxh3_many(size_t n, const uint8_t *const *bufs, const uint64_t *lens, uint64_t *out) {
    for (size_t i = 0; i < n; i++) out[i] = XXH3_64bits(bufs[i], (size_t)lens[i]);
}

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

int bs_record_layout(uint64_t start, uint32_t key_len, uint32_t meta_len, uint64_t payload_len,
                     uint16_t flags, uint32_t *payload_off, uint64_t *record_len) {
    if (key_len < 1 || key_len > BS_MAX_KEY || meta_len > BS_MAX_META ||
        payload_len > BS_MAX_PAYLOAD || (start % 8) != 0 || (flags & ~BS_REC_ALIGNED))
        return BS_EINVAL;
    uint64_t head_end = start + BS_RECORD_HEADER_SIZE + key_len + meta_len;
    uint64_t align = (flags & BS_REC_ALIGNED) ? BS_PAGE : 8;
    uint64_t payload_start = round_up(head_end, align);
    uint64_t end = round_up(payload_start + payload_len, align);
    *payload_off = (uint32_t)(payload_start - start);
    *record_len = end - start;
    return BS_OK;
}

static uint64_t header_checksum(const uint8_t *hdr, const uint8_t *key, uint32_t key_len,
                                const uint8_t *meta, uint32_t meta_len) {
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, hdr, 56);
    XXH3_64bits_update(&st, key, key_len);
    if (meta_len) XXH3_64bits_update(&st, meta, meta_len);
    return XXH3_64bits_digest(&st);
}

int bs_record_encode(const bs_record_info *info, const uint8_t *key, const uint8_t *meta,
                     uint8_t *out, size_t out_len) {
    uint64_t need = (uint64_t)BS_RECORD_HEADER_SIZE + info->key_len + info->meta_len;
    if (info->kind < BS_KIND_KV || info->kind > BS_KIND_TOMBSTONE || info->key_len < 1 ||
        info->key_len > BS_MAX_KEY || info->meta_len > BS_MAX_META ||
        info->payload_len > BS_MAX_PAYLOAD || info->payload_off < need ||
        out_len < info->payload_off || (info->flags & ~BS_REC_ALIGNED))
        return BS_EINVAL;
    memset(out, 0, info->payload_off);
    memcpy(out, RECORD_MAGIC, 4);
    out[4] = BS_FORMAT_VERSION;
    out[5] = info->kind;
    put16(out + 6, info->flags);
    put32(out + 8, info->key_len);
    put32(out + 12, info->meta_len);
    put32(out + 16, info->payload_off);
    put32(out + 20, info->ns);
    put64(out + 24, info->payload_len);
    put64(out + 32, info->record_len);
    put64(out + 40, info->seq);
    put64(out + 48, info->payload_xxh3);
    memcpy(out + BS_RECORD_HEADER_SIZE, key, info->key_len);
    if (info->meta_len) memcpy(out + BS_RECORD_HEADER_SIZE + info->key_len, meta, info->meta_len);
    put64(out + 56, header_checksum(out, key, info->key_len, meta, info->meta_len));
    return BS_OK;
}

int bs_record_decode(const uint8_t *buf, size_t len, bs_record_info *out) {
    if (len < BS_RECORD_HEADER_SIZE) return BS_ETRUNCATED;
    if (memcmp(buf, RECORD_MAGIC, 4) != 0) return BS_ECORRUPT;
    if (buf[4] > BS_FORMAT_VERSION) return BS_EVERSION;
    if (buf[4] == 0) return BS_ECORRUPT;
    bs_record_info r;
    r.kind = buf[5];
    r.flags = get16(buf + 6);
    r.key_len = get32(buf + 8);
    r.meta_len = get32(buf + 12);
    r.payload_off = get32(buf + 16);
    r.ns = get32(buf + 20);
    r.payload_len = get64(buf + 24);
    r.record_len = get64(buf + 32);
    r.seq = get64(buf + 40);
    r.payload_xxh3 = get64(buf + 48);
    if (r.kind < BS_KIND_KV || r.kind > BS_KIND_TOMBSTONE || (r.flags & ~BS_REC_ALIGNED) ||
        r.key_len < 1 || r.key_len > BS_MAX_KEY || r.meta_len > BS_MAX_META ||
        r.payload_len > BS_MAX_PAYLOAD)
        return BS_ECORRUPT;
    uint64_t head = (uint64_t)BS_RECORD_HEADER_SIZE + r.key_len + r.meta_len;
    /* the record ends at the payload's end rounded up to 8 (or 4096 if ALIGNED): less than a page of
     * padding. Bounding record_len keeps a scan's offsets near the file (found by fuzz/: a valid
     * header claiming a 2^63-byte record sent the next pread to a negative offset). */
    if (r.payload_off < head || r.record_len < (uint64_t)r.payload_off + r.payload_len ||
        (r.record_len % 8) != 0 || r.record_len - r.payload_off - r.payload_len >= BS_PAGE)
        return BS_ECORRUPT;
    if (len < head) return BS_ETRUNCATED;
    uint64_t want = header_checksum(buf, buf + BS_RECORD_HEADER_SIZE, r.key_len,
                                    buf + BS_RECORD_HEADER_SIZE + r.key_len, r.meta_len);
    if (want != get64(buf + 56)) return BS_ECHECKSUM;
    *out = r;
    return BS_OK;
}

/* Block header and footer share a frame: 8-byte magic, u32 version, fields, xxh3 of [0, 56) at 56. */
static void frame_begin(uint8_t *out, const uint8_t magic[8], uint32_t flags) {
    memset(out, 0, 64);
    memcpy(out, magic, 8);
    put32(out + 8, BS_FORMAT_VERSION);
    put32(out + 12, flags);
}

static void frame_end(uint8_t *out) { put64(out + 56, XXH3_64bits(out, 56)); }

static int frame_check(const uint8_t *buf, size_t len, const uint8_t magic[8], uint32_t *version) {
    if (len < 64) return BS_ETRUNCATED;
    if (memcmp(buf, magic, 8) != 0) return BS_ECORRUPT;
    if (XXH3_64bits(buf, 56) != get64(buf + 56)) return BS_ECHECKSUM;
    uint32_t v = get32(buf + 8);
    if (v == 0) return BS_ECORRUPT;
    if (v > BS_FORMAT_VERSION) return BS_EVERSION;
    *version = v;
    return BS_OK;
}

int bs_block_header_encode(const bs_block_header *h, uint8_t *out, size_t out_len) {
    if (out_len < 64) return BS_EINVAL;
    frame_begin(out, BLOCK_MAGIC, h->flags);
    put64(out + 16, h->block_id);
    put64(out + 24, h->store_id);
    put64(out + 32, h->created_ns);
    put64(out + 40, h->partition_hash);
    frame_end(out);
    return BS_OK;
}

int bs_block_header_decode(const uint8_t *buf, size_t len, bs_block_header *out) {
    uint32_t v;
    int rc = frame_check(buf, len, BLOCK_MAGIC, &v);
    if (rc) return rc;
    out->format_version = v;
    out->flags = get32(buf + 12);
    out->block_id = get64(buf + 16);
    out->store_id = get64(buf + 24);
    out->created_ns = get64(buf + 32);
    out->partition_hash = get64(buf + 40);
    return BS_OK;
}

int bs_footer_encode(const bs_footer *f, uint8_t *out, size_t out_len) {
    if (out_len < BS_FOOTER_SIZE) return BS_EINVAL;
    frame_begin(out, FOOTER_MAGIC, f->flags);
    put64(out + 16, f->block_id);
    put64(out + 24, f->data_end);
    put64(out + 32, f->record_count);
    put64(out + 40, f->min_seq);
    put64(out + 48, f->max_seq);
    frame_end(out);
    return BS_OK;
}

int bs_footer_decode(const uint8_t *buf, size_t len, bs_footer *out) {
    uint32_t v;
    int rc = frame_check(buf, len, FOOTER_MAGIC, &v);
    if (rc) return rc;
    out->format_version = v;
    out->flags = get32(buf + 12);
    out->block_id = get64(buf + 16);
    out->data_end = get64(buf + 24);
    out->record_count = get64(buf + 32);
    out->min_seq = get64(buf + 40);
    out->max_seq = get64(buf + 48);
    return BS_OK;
}
