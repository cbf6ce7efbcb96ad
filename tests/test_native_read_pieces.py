"""The blend's layer readers verify each record piece by piece as it is read (native/batch.c, read_run with
BS_READ_VERIFY_INLINE): a record's verdict is built from the byte counts preadv returns. Here the file
operations seam (bs_io_set) returns short reads (1 byte, a random prefix, all but 7 bytes) and EINTR at
random, over runs with gaps, empty records, records across piece edges and runs cut at IOV_MAX / 2 items,
with bytes flipped and files cut short: every record's status must equal the truth (the file's bytes
hashed whole) and the status the helper-thread verification gives on plain reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parent.parent / "native"

_HARNESS = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include "xxh.h"
#include "blockstore.h"
#include "internal.h"

extern const bs_fileops *bs_io;
static unsigned rs;
static unsigned rnd(void) { rs = rs * 1103515245u + 12345u; return rs >> 8; }
static int cut; /* short reads and EINTR on */

static ssize_t cut_preadv(void *ctx, int fd, const struct iovec *iov, int cnt, off_t off) {
    (void)ctx;
    if (!cut) return preadv(fd, iov, cnt, off);
    if (rnd() % 5 == 0) { errno = EINTR; return -1; }
    size_t total = 0, want, s = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    switch (rnd() % 4) {
        case 0: want = 1 + rnd() % (total ? total : 1); break;
        case 1: want = 1; break;
        case 2: want = total > 7 ? total - 7 : total; break;
        default: want = total;
    }
    if (want > total) want = total;
    struct iovec part[1024];
    int b = 0;
    for (; b < cnt && s < want; b++) {
        part[b] = iov[b];
        if (s + part[b].iov_len > want) part[b].iov_len = want - s;
        s += part[b].iov_len;
    }
    return preadv(fd, part, b, off);
}

int main(int argc, char **argv) {
    int trials = atoi(argv[1]);
    const char *dir = argv[2];
    bs_fileops ops = *bs_io;
    ops.preadv = cut_preadv;
    bs_io_set(&ops);
    long bad = 0, checked = 0;
    char path[4096];
    for (int trial = 0; trial < trials; trial++) {
        rs = (unsigned)trial * 7919u + 1u;
        size_t n = 1 + rnd() % (trial % 10 == 0 ? 1500 : 40);
        bs_read_item *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b);
        uint64_t off = rnd() % 100;
        size_t maxlen = trial % 3 == 0 ? 1500000 : 5000;
        for (size_t i = 0; i < n; i++) {
            unsigned t = rnd() % 6;
            uint64_t len = t == 0 ? 0 : t == 1 ? 1 : t == 2 ? (524288 - 5 + rnd() % 10) : rnd() % maxlen;
            if (n > 200 && len > 5000) len = rnd() % 5000;
            a[i].offset = off;
            a[i].len = len;
            off += len + (rnd() % 3 == 0 ? rnd() % 300 : 0);
        }
        size_t size = off;
        uint8_t *data = malloc(size + 1);
        for (size_t i = 0; i < size; i++) data[i] = (uint8_t)rnd();
        for (size_t i = 0; i < n; i++) a[i].expect_xxh3 = XXH3_64bits(data + a[i].offset, a[i].len);
        for (int d = rnd() % 4; d > 0 && size; d--) data[rnd() % size] ^= (uint8_t)(1u << (rnd() % 8));
        size_t written = size;
        if (rnd() % 5 == 0 && size) written = rnd() % size;
        snprintf(path, sizeof path, "%s/f%d", dir, trial);
        FILE *f = fopen(path, "w+");
        if (!f || fwrite(data, 1, written, f) != written || fflush(f)) return 2;
        int fd = fileno(f);
        for (size_t i = 0; i < n; i++) {
            a[i].dst = malloc(a[i].len + 1);
            b[i] = a[i];
            b[i].dst = malloc(a[i].len + 1);
        }
        uint64_t gap = rnd() % 3 == 0 ? 0 : 300;
        cut = 0;
        if (bs_read_many(fd, b, n, gap, BS_READ_VERIFY) != BS_OK) return 3;
        cut = trial % 2;
        if (bs_read_many(fd, a, n, gap, BS_READ_VERIFY | BS_READ_VERIFY_INLINE) != BS_OK) return 3;
        for (size_t i = 0; i < n; i++) {
            int truth = a[i].offset + a[i].len > written ? BS_ETRUNCATED
                      : XXH3_64bits(data + a[i].offset, a[i].len) != a[i].expect_xxh3 ? BS_ECHECKSUM : BS_OK;
            checked++;
            /* an empty record past the end of a run is truncated or not as the run ends: either way no bytes */
            if (a[i].status != b[i].status || (a[i].len && a[i].status != truth)) {
                if (bad++ < 5)
                    printf("trial %d record %zu of %zu (%lu bytes): inline %d, helper thread %d, truth %d\n", trial,
                           i, n, (unsigned long)a[i].len, a[i].status, b[i].status, truth);
            }
            if (a[i].status == BS_OK && a[i].len && memcmp(a[i].dst, data + a[i].offset, a[i].len)) bad++;
            free(a[i].dst);
            free(b[i].dst);
        }
        fclose(f);
        unlink(path);
        free(data);
        free(a);
        free(b);
    }
    printf("checked %ld records, %ld wrong\n", checked, bad);
    return bad != 0;
}
"""


def test_piece_verification_survives_short_reads_and_eintr(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/xxhash.h").exists():
        pytest.skip("no C compiler or xxhash.h")
    src, exe = tmp_path / "pieces.c", tmp_path / "pieces"
    src.write_text(_HARNESS)
    sources = [str(NATIVE / name) for name in ("batch.c", "io.c", "record.c", "multi.c")]
    subprocess.run([cc, "-O1", "-std=gnu11", f"-I{NATIVE}", str(src), *sources, "-lxxhash", "-lpthread", "-o", str(exe)],
                   check=True, capture_output=True)
    (tmp_path / "files").mkdir()
    out = subprocess.run([str(exe), "400", str(tmp_path / "files")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and ", 0 wrong" in out.stdout, out.stdout + out.stderr
