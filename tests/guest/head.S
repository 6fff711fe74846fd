/*
 * Boot code of xenkvm's test guest: the PVH entry note, the switch from 32-bit
 * protected mode to long mode, and the exception entry stubs.
 *
 * PVH entry (hvm/start_info.h): 32-bit protected mode, paging off, flat segments,
 * EBX = guest-physical address of struct hvm_start_info. We identity-map the first
 * 4 GiB with 2 MiB pages, enable long mode and call main(start_info_paddr).
 */
#include "xen.h"

#define GDT_CODE64 0x08
#define GDT_DATA   0x10

#define MSR_EFER   0xc0000080
#define EFER_LME   (1 << 8)
#define CR0_PE     (1 << 0)
#define CR0_PG     (1 << 31)
#define CR4_PAE    (1 << 5)
#define PTE_P_RW   0x003      /* present, writable */
#define PDE_2M     0x083      /* present, writable, 2 MiB page */

/* The ELF note that tells a PVH loader where to start us. */
        .section .note.Xen, "a", @note
        .p2align 2
        .long 4                         /* namesz: "Xen\0" */
        .long 4                         /* descsz: a 32-bit address */
        .long XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .p2align 2
        .long entry32
        .p2align 2

        .section .text.entry, "ax", @progbits
        .code32
        .globl entry32
entry32:
        cli
        cld
        lgdt    gdt_ptr

        /* Zero .bss (page tables, stack, ...); EBX (start_info) is preserved. */
        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %edi, %ecx
        shr     $2, %ecx
        xor     %eax, %eax
        rep stosl

        /* PML4[0] -> PDPT; PDPT[0..3] -> the four page directories. */
        movl    $(pdpt + PTE_P_RW), pml4
        mov     $pdpt, %edi
        mov     $(pd + PTE_P_RW), %eax
        mov     $4, %ecx
1:      mov     %eax, (%edi)
        add     $8, %edi
        add     $0x1000, %eax
        loop    1b

        /* 4 x 512 directory entries of 2 MiB each: 0 .. 4 GiB, identity. */
        mov     $pd, %edi
        mov     $PDE_2M, %eax
        mov     $2048, %ecx
2:      mov     %eax, (%edi)
        add     $8, %edi
        add     $0x200000, %eax
        loop    2b

        /* PAE + EFER.LME, then paging on: that activates long mode. */
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $(CR0_PE | CR0_PG), %eax
        mov     %eax, %cr0
        ljmp    $GDT_CODE64, $entry64

        .code64
entry64:
        mov     $GDT_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $stack_top, %rsp
        mov     %ebx, %edi              /* main(uint32_t start_info_paddr) */
        call    main
3:      ud2                             /* main does not return */
        jmp     3b

/*
 * Exception and interrupt stubs (also the LAPIC vectors the SMP and event checks
 * use): each pushes an error code (0 where the CPU pushes
 * none) and its vector, then exc_common saves the general registers and calls
 * exception_handler(struct frame *). If that returns, we resume with iretq.
 */
#define HAS_ERRCODE(v) ((v) == 8 || (v) == 10 || (v) == 11 || (v) == 12 || \
                        (v) == 13 || (v) == 14 || (v) == 17 || (v) == 21 || \
                        (v) == 29 || (v) == 30)

        .macro  STUB vec
        .p2align 4
exc_stub_\vec:
        .if HAS_ERRCODE(\vec)
        .else
        pushq   $0                      /* the CPU pushed no error code */
        .endif
        pushq   $\vec
        jmp     exc_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128,242,243,255,244
        STUB    \v
        .endr

exc_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %rbp
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, %rdi      /* 56 + 120 bytes pushed: RSP stays 16-byte aligned */
        cld
        call    exception_handler
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rbp
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $16, %rsp       /* vector and error code */
        iretq

/*
 * Entry of a vCPU started by VCPUOP_initialise in VCPU_HVM_MODE_64B (the vcpu_init
 * check): Xen loads flat long-mode segments with selector 0 and leaves GDTR as it was,
 * so load this GDT and real selectors first (an interrupt frame with CS 0 could not be
 * returned from). RSP, RDI and RSI come from the context; RBX holds the C entry.
 */
        .globl  ap_vcpuop_entry
ap_vcpuop_entry:
        lgdt    gdt_ptr64(%rip)
        pushq   $GDT_CODE64
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:      mov     $GDT_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        jmp     *%rbx

        .section .rodata
        .p2align 3
        /* exc_stubs[i]: entry of exception i (0..31); exc_stubs[32]: int $0x80;
         * [33..35]: the LAPIC vectors 0xf2 (kick), 0xf3 (upcall), 0xff (spurious);
         * [36]: 0xf4, the bench's LAPIC ping. */
        .globl  exc_stubs
exc_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128,242,243,255,244
        .quad   exc_stub_\v
        .endr

        /* Flat GDT: 64-bit code at 0x08, data at 0x10. */
        .p2align 3
gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: code, L=1, DPL 0, accessed */
        .quad   0x00cf93000000ffff      /* 0x10: data, 4 GiB, DPL 0, accessed */
gdt_end:
gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt
gdt_ptr64:                              /* lgdt in long mode: a 64-bit base */
        .word   gdt_end - gdt - 1
        .quad   gdt


/*
 * The AP trampoline: real-mode code that guest.c copies to AP_TRAMPOLINE (0x8000,
 * page-aligned, below 1 MiB) before it sends INIT/SIPI; the SIPI vector 0x08 starts
 * the AP at 0x0800:0000. It goes 16-bit -> 32-bit protected mode -> long mode with
 * the CR3 in ap_tramp_params, switches to the stack there and calls the entry
 * (ap_main). Everything is addressed through T(), the address in the copy.
 */
#define AP_TRAMPOLINE 0x8000
#define T(x) ((x) - ap_trampoline + AP_TRAMPOLINE)
#define CR0_CD_NW  0x60000000

        .section .rodata
        .p2align 4
        .globl  ap_trampoline, ap_trampoline_end, ap_tramp_params
        .code16
ap_trampoline:
        cli
        cld
        xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   T(tgdt_ptr)
        mov     %cr0, %eax
        and     $~CR0_CD_NW, %eax       /* INIT leaves caching disabled */
        or      $CR0_PE, %eax
        mov     %eax, %cr0
        ljmpl   $0x18, $T(ap_tramp32)

        .code32
ap_tramp32:
        mov     $GDT_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     T(ap_tramp_params), %eax        /* cr3: the BSP's page tables */
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $(CR0_PE | CR0_PG), %eax
        mov     %eax, %cr0
        ljmp    $GDT_CODE64, $T(ap_tramp64)

        .code64
ap_tramp64:
        mov     $GDT_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     T(ap_tramp_params) + 8, %rsp    /* stack top */
        mov     T(ap_tramp_params) + 16, %rax   /* entry: void ap_main(void) */
        call    *%rax
1:      cli
        hlt
        jmp     1b

        .p2align 3
tgdt:   .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf93000000ffff      /* 0x10: data, 4 GiB */
        .quad   0x00cf9b000000ffff      /* 0x18: 32-bit code, 4 GiB */
tgdt_end:
tgdt_ptr:
        .word   tgdt_end - tgdt - 1
        .long   T(tgdt)
        .p2align 3
ap_tramp_params:                        /* filled in the copy: cr3, stack top, entry */
        .quad   0, 0, 0
ap_trampoline_end:

        .section .bss.boot, "aw", @nobits
        .p2align 12
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4 * 4096
stack:  .skip   64 * 1024
stack_top:
/* The bench's stub page, placed right after the stack on purpose: on a
 * shadow-paging host one refill after an exit maps an aligned block of
 * neighbouring pages, so this page shares the stack's refill (see bench()). */
        .balign 4096
        .globl  bench_stub_page
bench_stub_page:
        .skip   4096

        .section .note.GNU-stack, "", @progbits
