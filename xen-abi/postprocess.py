#!/usr/bin/env python3
"""Post-process bindgen output for xen-abi (called by regenerate.sh).

usage: postprocess.py <file.rs> <pointer-int-type: u64|u32> <pack: yes|no>

1. Guest handles: a `*mut T` / `*const T` field or alias is a guest virtual
   address, never a host pointer; it becomes the guest's word-sized integer.
   This keeps the C layout and lets the structs derive zerocopy::FromBytes.
2. bindgen's helper types (bitfield storage, flexible array member) get the
   zerocopy traits so the structs that contain them can derive them too.
3. pack=yes (the 32-bit compat layout): every plain `#[repr(C)]` struct/union
   becomes `#[repr(C, packed(4))]`. i386 aligns uint64_t to 4 inside structs,
   but this Rust code is compiled for x86_64 where u64 is 8-aligned; capping
   the alignment at 4 reproduces the i386 layout. bindgen's layout assertions
   (clang's i686 numbers) prove it at compile time.
4. zerocopy::IntoBytes is added to every struct whose bytes are all
   initialized: bindgen was run with --explicit-padding, so a struct qualifies
   when all of its fields do (integers, arrays, bitfield storage, qualifying
   structs). Unions never qualify (zerocopy needs a global --cfg for those),
   nor do structs containing one or a flexible array member.
"""
import re
import sys

PRIMS = {"u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "usize", "isize"}
CTYPES = {
    "c_char": "i8", "c_schar": "i8", "c_uchar": "u8", "c_short": "i16", "c_ushort": "u16",
    "c_int": "i32", "c_uint": "u32", "c_longlong": "i64", "c_ulonglong": "u64",
}
HELPERS = ("__BindgenBitfieldUnit", "__IncompleteArrayField", "__BindgenUnionField")


def main():
    path, ptr_int, pack = sys.argv[1], sys.argv[2], sys.argv[3] == "yes"
    ctypes = dict(CTYPES)
    ctypes["c_long"] = "i64" if ptr_int == "u64" else "i32"
    ctypes["c_ulong"] = ptr_int
    lines = []
    for ln in open(path).read().split("\n"):
        # rustfmt splits long derive lists over several lines: join them back.
        if lines and lines[-1].startswith("#[derive(") and not lines[-1].endswith(")]"):
            lines[-1] += ("" if lines[-1].endswith("(") or ln.strip() == ")]" else " ") + ln.strip()
            lines[-1] = lines[-1].replace(",)]", ")]")
        else:
            lines.append(ln)

    # 1. pointers -> integers
    out = []
    for ln in lines:
        ln = re.sub(r"^(\s*pub [A-Za-z0-9_]+): \*(mut|const) [^,]+,$", r"\1: %s," % ptr_int, ln)
        ln = re.sub(r"^(pub type [A-Za-z0-9_]+) = \*(mut|const) [^;]+;$", r"\1 = %s;" % ptr_int, ln)
        out.append(ln)
    lines = out

    # Parse items: name -> (kind, [field types]); aliases.
    items, aliases = {}, {}
    i = 0
    while i < len(lines):
        m = re.match(r"^pub (struct|union) ([A-Za-z0-9_]+)(<[^>]*>)? \{$", lines[i])
        if m:
            fields, j = [], i + 1
            while lines[j] != "}":
                fm = re.match(r"^\s*pub [A-Za-z0-9_]+: (.+),$", lines[j])
                if fm:
                    fields.append(fm.group(1))
                j += 1
            items[m.group(2)] = (m.group(1), fields)
            i = j
        m = re.match(r"^pub type ([A-Za-z0-9_]+) = (.+);$", lines[i])
        if m:
            aliases[m.group(1)] = m.group(2)
        i += 1

    memo = {}

    def into_bytes(ty):
        ty = ty.strip()
        for pfx in ("::core::ffi::", "crate::ctypes32::"):
            if ty.startswith(pfx):
                ty = ctypes.get(ty[len(pfx):], "?")
        if ty in PRIMS:
            return True
        m = re.match(r"^\[(.+); [0-9]+usize\]$", ty)
        if m:
            return into_bytes(m.group(1))
        if re.match(r"^__BindgenBitfieldUnit<\[u8; [0-9]+usize\]>$", ty):
            return True
        if ty in aliases:
            return into_bytes(aliases[ty])
        if ty in items:
            if ty not in memo:
                memo[ty] = False  # no recursion through itself
                kind, fields = items[ty]
                memo[ty] = kind == "struct" and all(into_bytes(f) for f in fields)
            return memo[ty]
        return False

    # 2-4. attributes
    zc = "zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout"
    out = []
    for k, ln in enumerate(lines):
        nxt = lines[k + 1] if k + 1 < len(lines) else ""
        after = lines[k + 2] if k + 2 < len(lines) else ""
        m = re.match(r"^pub (struct|union) ([A-Za-z0-9_]+)", nxt)
        helper = m is not None and m.group(2) in HELPERS
        if ln.startswith("#[derive(") and m:
            name = m.group(2)
            if name == "__BindgenBitfieldUnit":
                ln = ln[:-2] + ", " + zc + ", zerocopy::IntoBytes)]"
            elif name == "__IncompleteArrayField":
                ln = ln[:-2] + ", Clone, Copy, " + zc + ")]"
            elif not helper and m.group(1) == "struct" and into_bytes(name):
                ln = ln[:-2] + ", zerocopy::IntoBytes)]"
        if pack and ln == "#[repr(C)]":
            names = [re.match(r"^pub (struct|union) ([A-Za-z0-9_]+)", x) for x in (nxt, after)]
            is_helper = any(x and x.group(2) in HELPERS for x in names)
            if not (nxt.startswith("#[repr(align(") or is_helper):
                ln = "#[repr(C, packed(4))]"
        out.append(ln)
    open(path, "w").write("\n".join(out))


if __name__ == "__main__":
    main()
