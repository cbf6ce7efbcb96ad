/* A layer loader's readers in C: each reader is one call (from a thread of the caller's) that claims
 * layer after layer of a set of reads in layer order, reads each with bs_read_files and publishes its
 * outcome, so a reader runs no Python, and needs no GIL, from its first layer to its last. The caller
 * waits for a layer in bs_layer_wait (a futex wait, the GIL released) while the readers go on. */
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

/* Every layer no reader has claimed yet is cancelled (each index is handed out once, so readers and
 * the caller may all drain at once): a wait for any of them then returns. */
static void drain(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q) {
    __atomic_store_n(&q->stop, 1, __ATOMIC_RELEASE);
    for (uint64_t j; (j = __atomic_fetch_add(&q->next, 1, __ATOMIC_ACQ_REL)) < n_jobs;)
        publish(&jobs[j], BS_LAYER_CANCELLED);
}

int bs_layer_read(bs_layer_job *jobs, size_t n_jobs, bs_layer_queue *q, uint64_t max_gap, int flags) {
    for (;;) {
        if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
            drain(jobs, n_jobs, q);
            return BS_OK;
        }
        uint64_t j = __atomic_fetch_add(&q->next, 1, __ATOMIC_ACQ_REL);
        if (j >= n_jobs) return BS_OK;
        bs_layer_job *job = &jobs[j];
        job->rc = bs_read_files(job->fds, job->counts, job->files, job->items, max_gap, flags);
        int failed = job->rc != BS_OK;
        for (size_t i = 0, n = 0; i < job->files; n += job->counts[i++])
            for (size_t k = n; k < n + job->counts[i]; k++) failed |= job->items[k].status != BS_OK;
        job->err = failed ? bs_last_errno() : 0;
        publish(job, failed ? BS_LAYER_FAILED : BS_LAYER_DONE);
        if (failed) { /* the caller raises at this layer: nothing after it is needed */
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
