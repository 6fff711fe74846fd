#!/bin/sh
# Rebuilds sched.bpf.o (checked in) from sched.bpf.c. Needs clang and libbpf-dev
# (Debian: apt-get install clang libbpf-dev). The VMM embeds the object; the
# normal cargo build does not run this.
set -eu
cd "$(dirname "$0")"
ARCH_INC=/usr/include/$(uname -m)-linux-gnu
clang -O2 -g -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -I"$ARCH_INC" -c sched.bpf.c -o sched.bpf.o
# Debug info is kept (BTF is needed for CO-RE); drop DWARF to keep the object small.
if command -v llvm-strip >/dev/null 2>&1; then
    llvm-strip -g sched.bpf.o
fi
ls -l sched.bpf.o
