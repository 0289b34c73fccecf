/*
 * Entry code for the mvm test guests (AT&T syntax, assembled by rustc's global_asm!).
 *
 * Three ways in, one way on:
 *   _start        Linux 64-bit boot protocol: long mode, rsi = struct boot_params.
 *   pvh_start32   PVH (Xen ELF note 18): 32-bit protected mode, paging off, ebx = hvm_start_info.
 *   ap_tramp_*    16-bit real-mode trampoline for application processors, copied below 1 MiB by
 *                 the BSP; it goes 16 -> 32 -> 64 bit through the same code as the PVH path.
 * Every path ends up on our own GDT and page tables (identity map of the first 4 GiB with 2 MiB
 * pages; 3..4 GiB uncached for the local APIC and other MMIO), then calls into Rust:
 *   rust_start(kind, info_paddr)   BSP, kind 1 = linux, 2 = pvh
 *   rust_ap_start(index)           APs, index 0.. in check-in order
 */

    .set KIND_LINUX, 1
    .set KIND_PVH, 2
    .set SEL_CODE32, 0x08
    .set SEL_CODE64, 0x10
    .set SEL_DATA, 0x18
    .set AP_STACK_SIZE, 4096
    .set MAX_APS, 31

/* PVH entry point note, read by QEMU (-kernel) and other PVH loaders. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32

    .section .text.entry, "ax"

    .code64
    .globl _start
_start:
    cli
    movq %rsi, %r12
    movq $KIND_LINUX, %r13
    jmp bsp_common64

    .code32
    .globl pvh_start32
pvh_start32:
    cli
    movl %ebx, %edi
    movl $KIND_PVH, %ebp
    jmp enter_long_mode

/* Reached from the real-mode trampoline with CS = SEL_CODE32. */
ap_start32:
    movw $SEL_DATA, %ax         /* DS still has the trampoline's real-mode base */
    movw %ax, %ds
    xorl %edi, %edi
    xorl %ebp, %ebp
    /* fall through */

/* 32-bit protected mode, paging off: edi = info pointer, ebp = kind (0 = AP). */
enter_long_mode:
    lgdt gdt_ptr
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax      /* clear EM */
    orl $0x80000023, %eax       /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $SEL_CODE64, $long_mode_from32

    .code64
long_mode_from32:
    movl %edi, %r12d
    movl %ebp, %r13d
    testl %ebp, %ebp
    jz ap_common64
    /* fall through for the BSP */

/* BSP in long mode: r12 = info pointer, r13 = kind. */
bsp_common64:
    /* Zero .bss (the loader normally did; do not rely on it). */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movq $bsp_stack_top, %rsp
    lgdt gdt_ptr
    movq $pml4, %rax
    movq %rax, %cr3
    movq %cr4, %rax
    orq $0x620, %rax            /* PAE | OSFXSR | OSXMMEXCPT */
    movq %rax, %cr4
    movq %cr0, %rax
    andq $0xfffffffffffffffb, %rax
    orq $0x22, %rax             /* NE | MP */
    movq %rax, %cr0
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    pushq $SEL_CODE64
    pushq $1f
    lretq
1:
    movq %r13, %rdi
    movq %r12, %rsi
    call rust_start
halt_forever:
    cli
    hlt
    jmp halt_forever

/* AP in long mode on our GDT and page tables: take an index and a stack, enter Rust. */
ap_common64:
    movl $1, %eax
    lock xaddl %eax, ap_next_index
    cmpl $MAX_APS, %eax
    jae halt_forever
    movl %eax, %edi
    incl %eax
    imull $AP_STACK_SIZE, %eax
    movq $ap_stacks, %rsp
    addq %rax, %rsp
    call rust_ap_start
    jmp halt_forever

/* Real-mode AP trampoline. The BSP copies [ap_tramp_start, ap_tramp_end) to a 4 KiB aligned
 * address below 1 MiB and sends SIPIs with that page number; only position-independent
 * references (relative to CS) and absolute 32-bit addresses of the image are used. */
    .code16
    .globl ap_tramp_start
    .globl ap_tramp_end
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdt_ptr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $ap_start32
    .balign 8
ap_tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code64

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff    /* 0x08: 32-bit code */
    .quad 0x00af9b000000ffff    /* 0x10: 64-bit code */
    .quad 0x00cf93000000ffff    /* 0x18: data */
gdt_end:
    .balign 16
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of 0..4 GiB with 2 MiB pages; the top GiB (MMIO: local APIC, IOAPIC) uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0003
    .quad pd + 0x1003
    .quad pd + 0x2003
    .quad pd + 0x3003
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x83   /* P | RW | PS */
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9b   /* P | RW | PWT | PCD | PS */
    .set page, page + 1
    .endr

    .section .bss, "aw", @nobits
    .balign 4
ap_next_index:
    .long 0

    .section .stacks, "aw", @nobits
    .balign 4096
    .space 65536
bsp_stack_top:
ap_stacks:
    .space AP_STACK_SIZE * (MAX_APS + 1)
