// Throughput of the integer multiply-accumulate schemes a sub-8-bit conv kernel can be built on, on this CPU.
//
// Each scheme's inner-loop step is written in inline assembly (so that the compiler neither hoists, shares nor
// shuffles anything) and runs on 8 independent accumulator registers: the time per step is the instructions'
// throughput on this core, with no loads, packing or epilogue. Printed per scheme, one JSON object per line:
// useful multiply-accumulates per step and nanoseconds per step (benchmarks/subbyte_schemes.py compiles this file,
// runs it and tabulates MACs per nanosecond). The steps (AVX-512 widths; the AVX2 ones are half as wide):
//
//   vpdpbusd_u8s8      AVX-512 VNNI vpdpbusd: 4 u8 x s8 products per int32 lane, 64 per zmm (any w, a <= 8 bits)
//   vpmaddubsw_i16     vpmaddubsw + vpaddw: 64 u8 x s8 products per zmm into int16 sums (narrow pairs; the widening
//                      once per chunk is not counted)
//   vpmaddwd_i16       vpmaddwd + vpaddd: 32 int16 x int16 products per zmm into int32 (the 8-bit x 8-bit kernel)
//   ulppack_vpmaddwd   the same two instructions with two values packed per 16-bit field (ULPPACK's middle term:
//                      (a0 + 2^s a1)(w1 + 2^s w0) holds a0 w0 + a1 w1): 64 products per zmm for <= 4-bit pairs; the
//                      shift/mask extraction every few steps is not counted
//   bitserial_w1a1     vpandq + vpopcntq + vpaddq: 512 one-bit products per zmm (AVX2: popcount from vpshufb nibble
//                      tables, 5 more instructions)
//   bitserial_w2a2     the 4 bit-plane pairs of 2-bit weights and activations: 4 x (and, popcount, add), 512 products
//   lut_w2a2           T-MAC style lookup: per 1-bit weight plane one vpshufb into 16-entry tables of sums of 4
//                      activations, + vpaddb: 2 planes x 64 lookups x 4 activations = 256 products per zmm step
//
// Nothing here is a kernel: it prices the arithmetic a kernel's inner loop would be made of.

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static volatile uint64_t sink;

static void report(const char *scheme, const char *isa, int macs, double ns, long steps) {
    printf("{\"scheme\": \"%s\", \"isa\": \"%s\", \"macs_per_step\": %d, \"ns_per_step\": %.5f}\n", scheme, isa, macs,
           ns / (double)steps);
}

#define ACC8 [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4), [c5] "+v"(c5), \
             [c6] "+v"(c6), [c7] "+v"(c7)

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq"))) static void run_avx512(
    long steps, const uint8_t *seed) {
    __m512i a = _mm512_loadu_si512((const void *)seed), w = _mm512_loadu_si512((const void *)(seed + 64));
    __m512i a1 = _mm512_xor_si512(a, w), w1 = _mm512_ror_epi64(w, 7);
    __m512i c0 = a, c1 = w, c2 = a1, c3 = w1, c4 = a, c5 = w, c6 = a1, c7 = w1, t0, t1, t2, t3;
    double t;

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpdpbusd %[w], %[a], %[c0]\n\t"
                         "vpdpbusd %[w], %[a], %[c1]\n\t"
                         "vpdpbusd %[w], %[a], %[c2]\n\t"
                         "vpdpbusd %[w], %[a], %[c3]\n\t"
                         "vpdpbusd %[w], %[a], %[c4]\n\t"
                         "vpdpbusd %[w], %[a], %[c5]\n\t"
                         "vpdpbusd %[w], %[a], %[c6]\n\t"
                         "vpdpbusd %[w], %[a], %[c7]\n\t"
                         : ACC8
                         : [a] "v"(a), [w] "v"(w));
    t = now_ns() - t;
    report("vpdpbusd_u8s8", "avx512", 64, t, steps * 8);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpmaddubsw %[w], %[a], %[t0]\n\t"
                         "vpaddw %[t0], %[c0], %[c0]\n\t"
                         "vpmaddubsw %[w], %[a], %[t1]\n\t"
                         "vpaddw %[t1], %[c1], %[c1]\n\t"
                         "vpmaddubsw %[w], %[a], %[t2]\n\t"
                         "vpaddw %[t2], %[c2], %[c2]\n\t"
                         "vpmaddubsw %[w], %[a], %[t3]\n\t"
                         "vpaddw %[t3], %[c3], %[c3]\n\t"
                         "vpmaddubsw %[w], %[a], %[t0]\n\t"
                         "vpaddw %[t0], %[c4], %[c4]\n\t"
                         "vpmaddubsw %[w], %[a], %[t1]\n\t"
                         "vpaddw %[t1], %[c5], %[c5]\n\t"
                         "vpmaddubsw %[w], %[a], %[t2]\n\t"
                         "vpaddw %[t2], %[c6], %[c6]\n\t"
                         "vpmaddubsw %[w], %[a], %[t3]\n\t"
                         "vpaddw %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "v"(a), [w] "v"(w));
    t = now_ns() - t;
    report("vpmaddubsw_i16", "avx512", 64, t, steps * 8);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpmaddwd %[w], %[a], %[t0]\n\t"
                         "vpaddd %[t0], %[c0], %[c0]\n\t"
                         "vpmaddwd %[w], %[a], %[t1]\n\t"
                         "vpaddd %[t1], %[c1], %[c1]\n\t"
                         "vpmaddwd %[w], %[a], %[t2]\n\t"
                         "vpaddd %[t2], %[c2], %[c2]\n\t"
                         "vpmaddwd %[w], %[a], %[t3]\n\t"
                         "vpaddd %[t3], %[c3], %[c3]\n\t"
                         "vpmaddwd %[w], %[a], %[t0]\n\t"
                         "vpaddd %[t0], %[c4], %[c4]\n\t"
                         "vpmaddwd %[w], %[a], %[t1]\n\t"
                         "vpaddd %[t1], %[c5], %[c5]\n\t"
                         "vpmaddwd %[w], %[a], %[t2]\n\t"
                         "vpaddd %[t2], %[c6], %[c6]\n\t"
                         "vpmaddwd %[w], %[a], %[t3]\n\t"
                         "vpaddd %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "v"(a), [w] "v"(w));
    t = now_ns() - t;
    report("vpmaddwd_i16", "avx512", 32, t, steps * 8);
    report("ulppack_vpmaddwd", "avx512", 64, t, steps * 8);  // the same instructions, 2 products per field

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpandq %[w], %[a], %[t0]\n\t"
                         "vpopcntq %[t0], %[t0]\n\t"
                         "vpaddq %[t0], %[c0], %[c0]\n\t"
                         "vpandq %[w], %[a], %[t1]\n\t"
                         "vpopcntq %[t1], %[t1]\n\t"
                         "vpaddq %[t1], %[c1], %[c1]\n\t"
                         "vpandq %[w], %[a], %[t2]\n\t"
                         "vpopcntq %[t2], %[t2]\n\t"
                         "vpaddq %[t2], %[c2], %[c2]\n\t"
                         "vpandq %[w], %[a], %[t3]\n\t"
                         "vpopcntq %[t3], %[t3]\n\t"
                         "vpaddq %[t3], %[c3], %[c3]\n\t"
                         "vpandq %[w], %[a], %[t0]\n\t"
                         "vpopcntq %[t0], %[t0]\n\t"
                         "vpaddq %[t0], %[c4], %[c4]\n\t"
                         "vpandq %[w], %[a], %[t1]\n\t"
                         "vpopcntq %[t1], %[t1]\n\t"
                         "vpaddq %[t1], %[c5], %[c5]\n\t"
                         "vpandq %[w], %[a], %[t2]\n\t"
                         "vpopcntq %[t2], %[t2]\n\t"
                         "vpaddq %[t2], %[c6], %[c6]\n\t"
                         "vpandq %[w], %[a], %[t3]\n\t"
                         "vpopcntq %[t3], %[t3]\n\t"
                         "vpaddq %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "v"(a), [w] "v"(w));
    t = now_ns() - t;
    report("bitserial_w1a1", "avx512", 512, t, steps * 8);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpandq %[w], %[a], %[t0]\n\t"
                         "vpopcntq %[t0], %[t0]\n\t"
                         "vpaddq %[t0], %[c0], %[c0]\n\t"
                         "vpandq %[w1], %[a], %[t1]\n\t"
                         "vpopcntq %[t1], %[t1]\n\t"
                         "vpaddq %[t1], %[c1], %[c1]\n\t"
                         "vpandq %[w], %[a1], %[t2]\n\t"
                         "vpopcntq %[t2], %[t2]\n\t"
                         "vpaddq %[t2], %[c2], %[c2]\n\t"
                         "vpandq %[w1], %[a1], %[t3]\n\t"
                         "vpopcntq %[t3], %[t3]\n\t"
                         "vpaddq %[t3], %[c3], %[c3]\n\t"
                         "vpandq %[w], %[a], %[t0]\n\t"
                         "vpopcntq %[t0], %[t0]\n\t"
                         "vpaddq %[t0], %[c4], %[c4]\n\t"
                         "vpandq %[w1], %[a], %[t1]\n\t"
                         "vpopcntq %[t1], %[t1]\n\t"
                         "vpaddq %[t1], %[c5], %[c5]\n\t"
                         "vpandq %[w], %[a1], %[t2]\n\t"
                         "vpopcntq %[t2], %[t2]\n\t"
                         "vpaddq %[t2], %[c6], %[c6]\n\t"
                         "vpandq %[w1], %[a1], %[t3]\n\t"
                         "vpopcntq %[t3], %[t3]\n\t"
                         "vpaddq %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "v"(a), [w] "v"(w), [a1] "v"(a1), [w1] "v"(w1));
    t = now_ns() - t;
    report("bitserial_w2a2", "avx512", 512, t, steps * 2);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpshufb %[i0], %[tab], %[t0]\n\t"
                         "vpaddb %[t0], %[c0], %[c0]\n\t"
                         "vpshufb %[i1], %[tab], %[t1]\n\t"
                         "vpaddb %[t1], %[c1], %[c1]\n\t"
                         "vpshufb %[i0], %[tab], %[t2]\n\t"
                         "vpaddb %[t2], %[c2], %[c2]\n\t"
                         "vpshufb %[i1], %[tab], %[t3]\n\t"
                         "vpaddb %[t3], %[c3], %[c3]\n\t"
                         "vpshufb %[i0], %[tab], %[t0]\n\t"
                         "vpaddb %[t0], %[c4], %[c4]\n\t"
                         "vpshufb %[i1], %[tab], %[t1]\n\t"
                         "vpaddb %[t1], %[c5], %[c5]\n\t"
                         "vpshufb %[i0], %[tab], %[t2]\n\t"
                         "vpaddb %[t2], %[c6], %[c6]\n\t"
                         "vpshufb %[i1], %[tab], %[t3]\n\t"
                         "vpaddb %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [tab] "v"(a), [i0] "v"(w), [i1] "v"(w1));
    t = now_ns() - t;
    report("lut_w2a2", "avx512", 256, t, steps * 4);

    __m512i s = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(c0, c1), _mm512_add_epi64(c2, c3)),
                                 _mm512_add_epi64(_mm512_add_epi64(c4, c5), _mm512_add_epi64(c6, c7)));
    sink = (uint64_t)_mm512_reduce_add_epi64(s);
}

__attribute__((target("avx2"))) static void run_avx2(long steps, const uint8_t *seed) {
    __m256i a = _mm256_loadu_si256((const __m256i *)seed), w = _mm256_loadu_si256((const __m256i *)(seed + 32));
    __m256i a1 = _mm256_xor_si256(a, w), w1 = _mm256_shuffle_epi32(w, 0x39);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    __m256i c0 = a, c1 = w, c2 = a1, c3 = w1, c4 = a, c5 = w, c6 = a1, c7 = w1, t0, t1, t2, t3;
    double t;

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpmaddubsw %[w], %[a], %[t0]\n\t"
                         "vpaddw %[t0], %[c0], %[c0]\n\t"
                         "vpmaddubsw %[w], %[a], %[t1]\n\t"
                         "vpaddw %[t1], %[c1], %[c1]\n\t"
                         "vpmaddubsw %[w], %[a], %[t2]\n\t"
                         "vpaddw %[t2], %[c2], %[c2]\n\t"
                         "vpmaddubsw %[w], %[a], %[t3]\n\t"
                         "vpaddw %[t3], %[c3], %[c3]\n\t"
                         "vpmaddubsw %[w], %[a], %[t0]\n\t"
                         "vpaddw %[t0], %[c4], %[c4]\n\t"
                         "vpmaddubsw %[w], %[a], %[t1]\n\t"
                         "vpaddw %[t1], %[c5], %[c5]\n\t"
                         "vpmaddubsw %[w], %[a], %[t2]\n\t"
                         "vpaddw %[t2], %[c6], %[c6]\n\t"
                         "vpmaddubsw %[w], %[a], %[t3]\n\t"
                         "vpaddw %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "x"(a), [w] "x"(w));
    t = now_ns() - t;
    report("vpmaddubsw_i16", "avx2", 32, t, steps * 8);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpmaddwd %[w], %[a], %[t0]\n\t"
                         "vpaddd %[t0], %[c0], %[c0]\n\t"
                         "vpmaddwd %[w], %[a], %[t1]\n\t"
                         "vpaddd %[t1], %[c1], %[c1]\n\t"
                         "vpmaddwd %[w], %[a], %[t2]\n\t"
                         "vpaddd %[t2], %[c2], %[c2]\n\t"
                         "vpmaddwd %[w], %[a], %[t3]\n\t"
                         "vpaddd %[t3], %[c3], %[c3]\n\t"
                         "vpmaddwd %[w], %[a], %[t0]\n\t"
                         "vpaddd %[t0], %[c4], %[c4]\n\t"
                         "vpmaddwd %[w], %[a], %[t1]\n\t"
                         "vpaddd %[t1], %[c5], %[c5]\n\t"
                         "vpmaddwd %[w], %[a], %[t2]\n\t"
                         "vpaddd %[t2], %[c6], %[c6]\n\t"
                         "vpmaddwd %[w], %[a], %[t3]\n\t"
                         "vpaddd %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [a] "x"(a), [w] "x"(w));
    t = now_ns() - t;
    report("vpmaddwd_i16", "avx2", 16, t, steps * 8);
    report("ulppack_vpmaddwd", "avx2", 32, t, steps * 8);  // the same instructions, 2 products per field

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c0], %[c0]\n\t"
                         "vpaddb %[t1], %[c0], %[c0]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c1], %[c1]\n\t"
                         "vpaddb %[t1], %[c1], %[c1]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c2], %[c2]\n\t"
                         "vpaddb %[t1], %[c2], %[c2]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c3], %[c3]\n\t"
                         "vpaddb %[t1], %[c3], %[c3]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c4], %[c4]\n\t"
                         "vpaddb %[t1], %[c4], %[c4]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c5], %[c5]\n\t"
                         "vpaddb %[t1], %[c5], %[c5]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c6], %[c6]\n\t"
                         "vpaddb %[t1], %[c6], %[c6]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c7], %[c7]\n\t"
                         "vpaddb %[t1], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1)
                         : [a] "x"(a), [w] "x"(w), [low] "x"(low), [lut] "x"(lut));
    t = now_ns() - t;
    report("bitserial_w1a1", "avx2", 256, t, steps * 8);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c0], %[c0]\n\t"
                         "vpaddb %[t1], %[c0], %[c0]\n\t"
                         "vpand %[w1], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c1], %[c1]\n\t"
                         "vpaddb %[t1], %[c1], %[c1]\n\t"
                         "vpand %[w], %[a1], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c2], %[c2]\n\t"
                         "vpaddb %[t1], %[c2], %[c2]\n\t"
                         "vpand %[w1], %[a1], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c3], %[c3]\n\t"
                         "vpaddb %[t1], %[c3], %[c3]\n\t"
                         "vpand %[w], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c4], %[c4]\n\t"
                         "vpaddb %[t1], %[c4], %[c4]\n\t"
                         "vpand %[w1], %[a], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c5], %[c5]\n\t"
                         "vpaddb %[t1], %[c5], %[c5]\n\t"
                         "vpand %[w], %[a1], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c6], %[c6]\n\t"
                         "vpaddb %[t1], %[c6], %[c6]\n\t"
                         "vpand %[w1], %[a1], %[t0]\n\t"
                         "vpsrlw $4, %[t0], %[t1]\n\t"
                         "vpand %[low], %[t0], %[t0]\n\t"
                         "vpand %[low], %[t1], %[t1]\n\t"
                         "vpshufb %[t0], %[lut], %[t0]\n\t"
                         "vpshufb %[t1], %[lut], %[t1]\n\t"
                         "vpaddb %[t0], %[c7], %[c7]\n\t"
                         "vpaddb %[t1], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1)
                         : [a] "x"(a), [w] "x"(w), [a1] "x"(a1), [w1] "x"(w1), [low] "x"(low), [lut] "x"(lut));
    t = now_ns() - t;
    report("bitserial_w2a2", "avx2", 256, t, steps * 2);

    t = now_ns();
    for (long i = 0; i < steps; i++)
        __asm__ volatile("vpshufb %[i0], %[tab], %[t0]\n\t"
                         "vpaddb %[t0], %[c0], %[c0]\n\t"
                         "vpshufb %[i1], %[tab], %[t1]\n\t"
                         "vpaddb %[t1], %[c1], %[c1]\n\t"
                         "vpshufb %[i0], %[tab], %[t2]\n\t"
                         "vpaddb %[t2], %[c2], %[c2]\n\t"
                         "vpshufb %[i1], %[tab], %[t3]\n\t"
                         "vpaddb %[t3], %[c3], %[c3]\n\t"
                         "vpshufb %[i0], %[tab], %[t0]\n\t"
                         "vpaddb %[t0], %[c4], %[c4]\n\t"
                         "vpshufb %[i1], %[tab], %[t1]\n\t"
                         "vpaddb %[t1], %[c5], %[c5]\n\t"
                         "vpshufb %[i0], %[tab], %[t2]\n\t"
                         "vpaddb %[t2], %[c6], %[c6]\n\t"
                         "vpshufb %[i1], %[tab], %[t3]\n\t"
                         "vpaddb %[t3], %[c7], %[c7]\n\t"
                         : ACC8, [t0] "=&v"(t0), [t1] "=&v"(t1), [t2] "=&v"(t2), [t3] "=&v"(t3)
                         : [tab] "x"(a), [i0] "x"(w), [i1] "x"(w1));
    t = now_ns() - t;
    report("lut_w2a2", "avx2", 128, t, steps * 4);

    __m256i s = _mm256_add_epi64(_mm256_add_epi64(_mm256_add_epi64(c0, c1), _mm256_add_epi64(c2, c3)),
                                 _mm256_add_epi64(_mm256_add_epi64(c4, c5), _mm256_add_epi64(c6, c7)));
    uint64_t out[4];
    memcpy(out, &s, sizeof out);
    sink = out[0] + out[1] + out[2] + out[3];
}

int main(int argc, char **argv) {
    long steps = argc > 1 ? atol(argv[1]) : 20000000L;
    uint8_t seed[128];
    for (int i = 0; i < 128; i++) seed[i] = (uint8_t)(i * 37 + 11);
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) run_avx2(steps, seed);
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vpopcntdq") &&
        __builtin_cpu_supports("avx512bw"))
        run_avx512(steps, seed);
    return 0;
}
