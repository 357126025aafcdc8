"""Run a command under the seccomp filter systemd's MemoryDenyWriteExecute=yes installs.

    python3 packaging/mdwe.py COMMAND [ARG...]     # e.g. packaging/smoke.sh dist/rbee/rbee
    python3 packaging/mdwe.py --self-test          # shows the filter refuses W+X memory

The unit sets MemoryDenyWriteExecute=yes, which makes these calls fail with EPERM for the service
and every process it starts: mmap() asking for PROT_WRITE|PROT_EXEC together, mprotect() and
pkey_mprotect() asking for PROT_EXEC, shmat() asking for SHM_EXEC (systemd's seccomp-util.c).
A JIT, or libffi without static trampolines, would break under it. systemd need not run here:
this installs the same rules (x86-64) with prctl and execs the command, so the hive, its workers
and llama.cpp can be shown to work under them without a service manager.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
NR_MMAP, NR_MPROTECT, NR_SHMAT, NR_PKEY_MPROTECT = 9, 10, 30, 329
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
ARG2_LOW = 16 + 2 * 8  # offsetof(struct seccomp_data, args[2]), low 32 bits (little-endian)

# classic BPF opcodes
LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06


def program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k); a jump goes to (index of the next instruction + jt/jf)."""
    deny = (RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)
    allow = (RET_K, 0, 0, SECCOMP_RET_ALLOW)
    return [
        (LD_W_ABS, 0, 0, 4),  # 0: arch
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),  # 1: -> 3
        allow,  # 2: other ABIs: SystemCallArchitectures= handles them
        (LD_W_ABS, 0, 0, 0),  # 3: syscall number
        (JEQ_K, 3, 0, NR_MMAP),  # 4: -> 8
        (JEQ_K, 6, 0, NR_MPROTECT),  # 5: -> 12
        (JEQ_K, 5, 0, NR_PKEY_MPROTECT),  # 6: -> 12
        (JEQ_K, 8, 12, NR_SHMAT),  # 7: -> 16, else -> 20
        (LD_W_ABS, 0, 0, ARG2_LOW),  # 8: mmap: both PROT_WRITE and PROT_EXEC?
        (AND_K, 0, 0, PROT_WRITE | PROT_EXEC),
        (JEQ_K, 0, 9, PROT_WRITE | PROT_EXEC),  # 10: -> 11, else -> 20
        deny,  # 11
        (LD_W_ABS, 0, 0, ARG2_LOW),  # 12: mprotect, pkey_mprotect: any PROT_EXEC?
        (AND_K, 0, 0, PROT_EXEC),
        (JEQ_K, 0, 5, PROT_EXEC),  # 14: -> 15, else -> 20
        deny,  # 15
        (LD_W_ABS, 0, 0, ARG2_LOW),  # 16: shmat: SHM_EXEC?
        (AND_K, 0, 0, SHM_EXEC),
        (JEQ_K, 0, 1, SHM_EXEC),  # 18: -> 19, else -> 20
        deny,  # 19
        allow,  # 20
    ]


def install_filter() -> None:
    """Install the filter in this process; it is inherited by everything it starts."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise SystemExit("mdwe.py: only Linux x86-64 is supported")
    insns = program()
    code = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = SockFprog(len(insns), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def self_test() -> int:
    """Show the filter refuses a W+X mapping but allows ordinary memory."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    made_exec = libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, mmap.PROT_READ | PROT_EXEC)
    try:
        mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        wx_refused = False
    except PermissionError:
        wx_refused = True
    if wx_refused and made_exec != 0:
        print("mdwe: W+X mmap and mprotect(PROT_EXEC) refused (EPERM); ordinary mapping allowed")
        return 0
    print("mdwe: the filter is not working", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    install_filter()
    if argv == ["--self-test"]:
        return self_test()
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
