/* LD_PRELOAD shim: CPUID faults (ARCH_SET_CPUID) and is answered with the features of an
 * AVX2-only CPU (AVX-512, VNNI, BF16 and AMX bits cleared), so libraries that dispatch on CPUID
 * (ONNX Runtime's MLAS, PyTorch, oneDNN, MKL) take their AVX2 code paths at native speed. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <asm/prctl.h>
#include <cpuid.h>

static void set_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31)); /* avx512 f dq ifma pf er cd bw vl */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14)); /* avx512 vbmi vbmi2 vnni bitalg vpopcntdq */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25)); /* 4vnniw 4fmaps vp2intersect amx-bf16 avx512fp16 amx-tile amx-int8 */
    }
    if (leaf == 7 && sub == 1) *a &= ~((1u << 4) | (1u << 5)); /* avx-vnni, avx512-bf16 */
    if (leaf == 0xd && sub == 0) *a &= ~0xe0u; /* no AVX-512 state components (opmask, ZMM) */
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = ctx_;
    greg_t *r = ctx->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { signal(SIGSEGV, SIG_DFL); return; } /* a real fault: let it crash */
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_faulting(0);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_faulting(1);
    mask(leaf, sub, &a, &b, &c, &d);
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    set_faulting(1);
}
