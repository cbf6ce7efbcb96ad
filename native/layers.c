/* A layer loader's readers in C: each reader is one call (from a thread of the caller's) that claims
 * the parts of layer after layer (a part: one file's reads of a layer) in layer order, reads each with
 * bs_read_many and publishes a layer when its last part is in, so a reader runs no Python, and needs no
 * GIL, from its first layer to its last. The caller waits for a layer in bs_layer_wait (a futex wait, the
 * GIL released) while the readers go on. */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "blockstore.h"
#include "internal.h"

static void wake_all(int32_t *word) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static void wait_while(int32_t *word, int32_t value) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0); /* spurious wake-ups: rechecked */
#else
    (void)word;
    (void)value;
    struct timespec pause = {0, 20000};
    nanosleep(&pause, NULL);
#endif
}

static void publish(bs_layer_job *job, int32_t state) {
    __atomic_store_n(&job->state, state, __ATOMIC_RELEASE);
    wake_all(&job->state);
}

/* A layer is read in parts, one file (block) each, claimed by any reader: the layer the caller waits for
 * next is read by every reader at once, so layers arrive one after another at the readers' combined speed.
 * A reader per layer (the first design) made them arrive in bursts, a reader-count of layers at a time,
 * each a single thread's read after the last: the caller computed the first layers of a burst, then
 * waited, and its last layers came after the last burst (an H100, 8B shape, 4k warm: the loader done at
 * 29 ms, the blend at 43). The part that ends a layer's count publishes it, so each layer is published once. */
static void part_done(bs_layer_job *job, int32_t outcome) {
    if (outcome == BS_LAYER_FAILED) __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    if (outcome == BS_LAYER_CANCELLED) __atomic_store_n(&job->cancelled, 1, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&job->parts_left, 1, __ATOMIC_ACQ_REL) != 0) return;
    publish(job, __atomic_load_n(&job->failed, __ATOMIC_RELAXED)      ? BS_LAYER_FAILED
                 : __atomic_load_n(&job->cancelled, __ATOMIC_RELAXED) ? BS_LAYER_CANCELLED
                                                                      : BS_LAYER_DONE);
}

/* Part u of the queue (parts are numbered job by job, file by file) as a job and a file in it. `cursor`
 * and `base` (parts before job *cursor) belong to one caller, whose claims only grow. */
static bs_layer_job *part_of(bs_layer_job *jobs, size_t n_jobs, uint64_t u, size_t *cursor, uint64_t *base,
                             size_t *file) {
    while (*cursor < n_jobs && u >= *base + jobs[*cursor].files) *base += jobs[(*cursor)++].files;
    if (*cursor >= n_jobs) return NULL;
    *file = (size_t)(u - *base);
    return &jobs[*cursor];
}

/* Every part no reader has claimed yet is cancelled (each part is handed out once, so readers and the
 * caller may all drain at once): every layer then gets published, and a wait for any of them returns. */
static void drain(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q) {
    __atomic_store_n(&q->stop, 1, __ATOMIC_RELEASE);
    size_t cursor = 0, file;
    uint64_t base = 0;
    for (uint64_t u;;) {
        u = __atomic_fetch_add(&q->next, 1, __ATOMIC_ACQ_REL);
        bs_layer_job *job = part_of(jobs, n_jobs, u, &cursor, &base, &file);
        if (!job) return;
        part_done(job, BS_LAYER_CANCELLED);
    }
}

/* The items of `file` in a job: where they start in job->items. */
static size_t items_before(const bs_layer_job *job, size_t file) {
    size_t at = 0;
    for (size_t i = 0; i < file; i++) at += job->counts[i];
    return at;
}

/* Cold reads: a layer's files are announced (runs not cached) when its first part is claimed, and the
 * layer LOOKAHEAD after it too, so the device has about as many layers in flight as it had with a reader
 * per layer (8 readers on a GPU host). */
#define LOOKAHEAD 8

static void announce(bs_layer_job *jobs, size_t n_jobs, size_t j, uint64_t max_gap) {
    if (j < n_jobs) bs_announce_files(jobs[j].fds, jobs[j].counts, jobs[j].files, jobs[j].items, max_gap);
}

int bs_layer_read(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q, uint64_t max_gap, int flags) {
    size_t cursor = 0, file;
    uint64_t base = 0;
    for (;;) {
        if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
            drain(jobs, n_jobs, q);
            return BS_OK;
        }
        uint64_t u = __atomic_fetch_add(&q->next, 1, __ATOMIC_ACQ_REL);
        bs_layer_job *job = part_of(jobs, n_jobs, u, &cursor, &base, &file);
        if (!job) return BS_OK;
        if ((flags & BS_READ_WILLNEED) && file == 0) {
            if (cursor == 0)
                for (size_t j = 0; j < LOOKAHEAD; j++) announce(jobs, n_jobs, j, max_gap);
            announce(jobs, n_jobs, cursor + LOOKAHEAD, max_gap);
        }
        size_t at = items_before(job, file), n = job->counts[file];
        int rc = bs_read_many(job->fds[file], job->items + at, n, max_gap,
                              (flags & ~BS_READ_WILLNEED) | BS_READ_VERIFY_INLINE);
        int failed = rc != BS_OK;
        for (size_t k = at; k < at + n; k++) failed |= job->items[k].status != BS_OK;
        if (failed) { /* the caller raises at this layer: nothing after it is needed */
            int32_t zero = 0;
            if (rc != BS_OK) __atomic_store_n(&job->rc, rc, __ATOMIC_RELAXED);
            __atomic_compare_exchange_n(&job->err, &zero, bs_last_errno(), 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            __atomic_store_n(&q->stop, 1, __ATOMIC_RELEASE);
        }
        part_done(job, failed ? BS_LAYER_FAILED : BS_LAYER_DONE);
        if (failed) {
            drain(jobs, n_jobs, q);
            return BS_OK;
        }
    }
}

int bs_layer_poll(const bs_layer_job *job) { return __atomic_load_n(&job->state, __ATOMIC_ACQUIRE); }

int bs_layer_wait(bs_layer_job *job) {
    int32_t state;
    while ((state = __atomic_load_n(&job->state, __ATOMIC_ACQUIRE)) == BS_LAYER_PENDING)
        wait_while(&job->state, BS_LAYER_PENDING);
    return state;
}

void bs_layer_cancel(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q) { drain(jobs, n_jobs, q); }
