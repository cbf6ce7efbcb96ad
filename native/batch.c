/* Batched appends and coalesced batched reads: the hot paths, one C call per batch. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "xxh.h"

#include "blockstore.h"
#include "internal.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static const uint8_t zero_page[BS_PAGE];

/* After a transfer of `done` bytes starting at iov[i]: the index of the first iovec not yet complete,
 * with that iovec trimmed by what of it was transferred (short reads and writes). */
static size_t advance_iov(struct iovec *iov, size_t cnt, size_t i, size_t done) {
    while (i < cnt && done >= iov[i].iov_len) {
        done -= iov[i].iov_len;
        i++;
    }
    if (done) {
        iov[i].iov_base = (uint8_t *)iov[i].iov_base + done;
        iov[i].iov_len -= done;
    }
    return i;
}

/* Write every byte the iovec array describes, at off; advances past short writes and EINTR.
 * The array is modified in place. */
static int pwritev_all(int fd, struct iovec *iov, size_t cnt, uint64_t off) {
    size_t i = 0;
    while (i < cnt) {
        int batch = (int)((cnt - i) < IOV_MAX ? (cnt - i) : IOV_MAX);
        ssize_t r = bs_io->pwritev(bs_io->ctx, fd, iov + i, batch, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return bs_os_error(errno);
        }
        if (r == 0) return bs_os_error(EIO);
        off += (uint64_t)r;
        i = advance_iov(iov, cnt, i, (size_t)r);
    }
    return BS_OK;
}

/* Checksums are computed on a helper thread one group ahead of the writes: xxh3 runs at ~23 GB/s
 * and buffered writes at ~5.6 GB/s here, so done serially hashing would cost ~20 % of a put.
 * Below PIPELINE_MIN bytes a thread is not worth its start-up (~20 us). */
#define PIPELINE_MIN (4u << 20)
#define GROUP_BYTES (4u << 20)

typedef struct hasher {
    bs_append_item *items;
    size_t n;
    size_t done; /* items[0..done) have payload_xxh3; guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} hasher;

static void *hash_items(void *arg) {
    hasher *h = arg;
    for (size_t i = 0; i < h->n; i++) {
        h->items[i].payload_xxh3 = XXH3_64bits(h->items[i].payload, (size_t)h->items[i].payload_len);
        pthread_mutex_lock(&h->mu);
        h->done = i + 1;
        pthread_cond_signal(&h->cv);
        pthread_mutex_unlock(&h->mu);
    }
    return NULL;
}

static void wait_hashed(hasher *h, size_t upto) {
    pthread_mutex_lock(&h->mu);
    while (h->done < upto) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
}

int bs_append(int fd, uint64_t offset, bs_append_item *items, size_t n, int flags, uint64_t *end_out) {
    if (n == 0) {
        *end_out = offset;
        return BS_OK;
    }
    if (offset % 8) return BS_EINVAL;
    uint64_t pos = offset, arena_len = 0, payload_total = 0;
    for (size_t i = 0; i < n; i++) {
        bs_append_item *it = &items[i];
        if (it->kind < BS_KIND_KV || it->kind > BS_KIND_TOMBSTONE) return BS_EINVAL;
        if (it->payload_len >= BS_PAGE) it->flags |= BS_REC_ALIGNED;
        int rc = bs_record_layout(pos, it->key_len, it->meta_len, it->payload_len, it->flags,
                                  &it->payload_off, &it->record_len);
        if (rc) return rc;
        it->offset = pos;
        pos += it->record_len;
        arena_len += it->payload_off;
        payload_total += it->payload_len;
    }
    uint8_t *arena = malloc(arena_len);
    struct iovec *iov = malloc(sizeof(struct iovec) * 3 * n);
    if (!arena || !iov) {
        free(arena);
        free(iov);
        return BS_ENOMEM;
    }
    hasher h = {items, n, n, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    pthread_t thread;
    int threaded = 0;
    if (!(flags & BS_APPEND_HAVE_CHECKSUMS)) {
        h.done = 0;
        if (payload_total >= PIPELINE_MIN && pthread_create(&thread, NULL, hash_items, &h) == 0)
            threaded = 1;
        else
            hash_items(&h);
    }
    int rc = BS_OK;
    uint8_t *a = arena;
    size_t first = 0;
    uint64_t group_off = offset;
    while (first < n && rc == BS_OK) {
        /* one group: items [first, last) of about GROUP_BYTES, written with one pwritev run */
        size_t last = first;
        uint64_t bytes = 0;
        while (last < n && (last == first || bytes + items[last].record_len <= GROUP_BYTES)) {
            bytes += items[last].record_len;
            last++;
        }
        wait_hashed(&h, last);
        size_t cnt = 0;
        for (size_t i = first; i < last && rc == BS_OK; i++) {
            bs_append_item *it = &items[i];
            bs_record_info info = {it->kind, it->flags, it->key_len, it->meta_len, it->payload_off,
                                   it->ns, it->payload_len, it->record_len, it->seq, it->payload_xxh3};
            rc = bs_record_encode(&info, it->key, it->meta, a, it->payload_off);
            iov[cnt++] = (struct iovec){a, it->payload_off};
            a += it->payload_off;
            if (it->payload_len) iov[cnt++] = (struct iovec){(void *)it->payload, (size_t)it->payload_len};
            size_t pad = (size_t)(it->record_len - it->payload_off - it->payload_len);
            if (pad) iov[cnt++] = (struct iovec){(void *)zero_page, pad};
        }
        if (rc == BS_OK) rc = pwritev_all(fd, iov, cnt, group_off);
        group_off += bytes;
        first = last;
    }
    if (threaded) pthread_join(thread, NULL); /* also on failure: the thread reads caller memory */
    if (rc == BS_OK && (flags & BS_APPEND_SYNC)) rc = bs_file_sync(fd);
    free(arena);
    free(iov);
    if (rc == BS_OK) *end_out = pos;
    return rc;
}

/* Verifying as the bytes arrive (BS_READ_VERIFY_INLINE): a run is read a piece at a time and each piece
 * hashed at once, while it is still in this core's cache, instead of read whole and hashed again from
 * memory on a helper thread. The blend's layer readers (layers.c) run one per core on a GPU host: a
 * verifier thread per reader doubled the threads competing with the one that issues the GPU's work, and
 * hashing from memory read every byte a second time (the xxh3 check was 17-25 % of the loader's time on
 * an H100 host, bench/README.md). A piece fits a core's L2 cache. */
#define VERIFY_PIECE (512u << 10)

/* Hash the bytes of items[*cur..last] that lie in file range [lo, hi) (the piece just read) into st; an
 * item whose last byte is in gets its verdict in bad[] and the state restarts for the next one. */
static void hash_piece(const bs_read_item *items, size_t first, size_t last, size_t *cur, XXH3_state_t *st,
                       uint64_t lo, uint64_t hi, uint8_t *bad) {
    for (; *cur <= last; (*cur)++) {
        const bs_read_item *it = &items[*cur];
        uint64_t end = it->offset + it->len;
        uint64_t a = it->offset > lo ? it->offset : lo;
        uint64_t b = end < hi ? end : hi;
        if (b > a) XXH3_64bits_update(st, it->dst + (a - it->offset), (size_t)(b - a));
        if (end > hi) return; /* the rest of it comes with a later piece */
        bad[*cur - first] = XXH3_64bits_digest(st) != it->expect_xxh3;
        XXH3_64bits_reset(st);
    }
}

/* The first `limit` bytes that iov[0..cnt) describe, as a copy in `out` (the array is not modified):
 * how many iovecs that takes. */
static int capped_iov(const struct iovec *iov, int cnt, size_t limit, struct iovec *out) {
    int b = 0;
    for (size_t sum = 0; b < cnt && sum < limit; b++) {
        out[b] = iov[b];
        if (sum + out[b].iov_len > limit) out[b].iov_len = limit - sum;
        sum += out[b].iov_len;
    }
    return b;
}

/* Read one run of items [first, last] with as few preadv calls as possible; gaps go to scratch.
 * With `inline_verify`, in pieces of VERIFY_PIECE bytes, each hashed as it arrives. */
static void read_run(int fd, bs_read_item *items, size_t first, size_t last, uint8_t *scratch,
                     struct iovec *iov, int inline_verify) {
    size_t cnt = 0;
    uint64_t start = items[first].offset;
    for (size_t i = first; i <= last; i++) {
        if (i > first) {
            uint64_t prev_end = items[i - 1].offset + items[i - 1].len;
            if (items[i].offset > prev_end)
                iov[cnt++] = (struct iovec){scratch, (size_t)(items[i].offset - prev_end)};
        }
        if (items[i].len) iov[cnt++] = (struct iovec){items[i].dst, (size_t)items[i].len};
    }
    XXH3_state_t st;
    uint8_t bad[IOV_MAX / 2]; /* a run holds at most IOV_MAX / 2 items (bs_read_many's run_cap) */
    size_t cur = first;
    if (inline_verify) {
        XXH3_64bits_reset(&st);
        memset(bad, 1, sizeof bad); /* an item never hashed whole is never called good */
    }
    struct iovec piece[IOV_MAX];
    uint64_t off = start;
    size_t k = 0;
    int status = BS_OK;
    while (k < cnt) {
        int batch = (int)((cnt - k) < IOV_MAX ? (cnt - k) : IOV_MAX);
        const struct iovec *use = iov + k;
        if (inline_verify) {
            batch = capped_iov(iov + k, batch, VERIFY_PIECE, piece);
            use = piece;
        }
        ssize_t r = bs_io->preadv(bs_io->ctx, fd, use, batch, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            status = bs_os_error(errno);
            break;
        }
        if (r == 0) break; /* end of file: the items past `off` are truncated */
        if (inline_verify) hash_piece(items, first, last, &cur, &st, off, off + (uint64_t)r, bad);
        off += (uint64_t)r;
        k = advance_iov(iov, cnt, k, (size_t)r);
    }
    if (inline_verify && status == BS_OK) hash_piece(items, first, last, &cur, &st, off, off, bad); /* empty items at the end */
    for (size_t i = first; i <= last; i++) {
        if (status != BS_OK)
            items[i].status = status;
        else if (items[i].offset + items[i].len > off)
            items[i].status = BS_ETRUNCATED;
        else if (inline_verify && bad[i - first])
            items[i].status = BS_ECHECKSUM;
        else
            items[i].status = BS_OK;
    }
}

/* Verification runs on a helper thread one read behind: it hashes items the reader has finished
 * while the reader fills the next ones, so checking costs little wall time on two cores. */
typedef struct verifier {
    bs_read_item *items;
    size_t n;
    size_t ready; /* items[0..ready) are read (or failed); guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} verifier;

static void verify_item(bs_read_item *it) {
    if (it->status == BS_OK && XXH3_64bits(it->dst, (size_t)it->len) != it->expect_xxh3)
        it->status = BS_ECHECKSUM;
}

static void *verify_items(void *arg) {
    verifier *v = arg;
    size_t done = 0;
    while (done < v->n) {
        pthread_mutex_lock(&v->mu);
        while (v->ready <= done) pthread_cond_wait(&v->cv, &v->mu);
        size_t upto = v->ready;
        pthread_mutex_unlock(&v->mu);
        for (; done < upto; done++) verify_item(&v->items[done]);
    }
    return NULL;
}

static void publish_read(verifier *v, size_t upto) {
    pthread_mutex_lock(&v->mu);
    v->ready = upto;
    pthread_cond_signal(&v->cv);
    pthread_mutex_unlock(&v->mu);
}

/* The end (exclusive) of the run starting at `first`: items whose gaps are <= max_gap, at most
 * `cap_items` of them and, if cap_bytes, about cap_bytes of span. */
static size_t run_end(const bs_read_item *items, size_t n, size_t first, uint64_t max_gap, size_t cap_items,
                      uint64_t cap_bytes) {
    size_t last = first;
    while (last + 1 < n && last + 1 - first < cap_items &&
           items[last + 1].offset - (items[last].offset + items[last].len) <= max_gap &&
           (!cap_bytes || items[last + 1].offset + items[last + 1].len - items[first].offset <= cap_bytes))
        last++;
    return last + 1;
}

#define READ_PIPELINE_MIN (4u << 20)
#define READ_SUBRUN_BYTES (8u << 20)

int bs_read_many(int fd, bs_read_item *items, size_t n, uint64_t max_gap, int flags) {
    if (n == 0) return BS_OK;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && items[i].offset < items[i - 1].offset + items[i - 1].len) return BS_EINVAL;
        total += items[i].len;
    }
    if (max_gap > (64u << 20)) return BS_EINVAL;
    uint8_t *scratch = max_gap ? malloc((size_t)max_gap) : NULL;
    /* a run never needs more than 2 iovecs per item, and is cut at IOV_MAX / 2 items */
    size_t run_cap = n < IOV_MAX / 2 ? n : IOV_MAX / 2;
    struct iovec *iov = malloc(sizeof(struct iovec) * 2 * run_cap);
    if ((max_gap && !scratch) || !iov) {
        free(scratch);
        free(iov);
        return BS_ENOMEM;
    }
    /* Announce every whole run first, so the device sees a deep queue of large requests instead of
     * one synchronous read at a time (cold reads). */
    if (flags & BS_READ_WILLNEED)
        for (size_t first = 0, end; first < n; first = end) {
            end = run_end(items, n, first, max_gap, run_cap, 0);
            bs_io->advise_willneed(bs_io->ctx, fd, (off_t)items[first].offset,
                                   (off_t)(items[end - 1].offset + items[end - 1].len - items[first].offset));
        }
    verifier v = {items, n, 0, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    pthread_t thread;
    int inline_verify = (flags & BS_READ_VERIFY) && (flags & BS_READ_VERIFY_INLINE);
    int threaded = (flags & BS_READ_VERIFY) && !inline_verify && total >= READ_PIPELINE_MIN &&
                   pthread_create(&thread, NULL, verify_items, &v) == 0;
    /* With a verifier, runs are read in sub-runs of ~8 MiB so it can start on the first one early. */
    uint64_t cap_bytes = threaded ? READ_SUBRUN_BYTES : 0;
    for (size_t first = 0, end; first < n; first = end) {
        end = run_end(items, n, first, max_gap, run_cap, cap_bytes);
        read_run(fd, items, first, end - 1, scratch, iov, inline_verify);
        if (threaded) publish_read(&v, end);
    }
    if (threaded)
        pthread_join(thread, NULL);
    else if ((flags & BS_READ_VERIFY) && !inline_verify)
        for (size_t i = 0; i < n; i++) verify_item(&items[i]);
    free(scratch);
    free(iov);
    return BS_OK;
}
