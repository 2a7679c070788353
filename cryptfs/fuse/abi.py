"""The kernel's FUSE ABI, one to one with ``<linux/fuse.h>``: structures, opcodes, flags.

Nothing else lives here: no I/O, no policy.  Every structure of fuse.h that the
layer reads or writes is a :class:`CStruct` whose field list mirrors the C
declaration in order, so that ``tests/test_fuse_abi.py`` can compile a C program
against the system's fuse.h and compare ``sizeof``/``offsetof`` field by field.

Byte order is the machine's (the kernel and the daemon share it); every
structure in fuse.h is explicitly padded to 64 bits, so the struct module's
``=`` (native order, standard sizes, no implicit padding) reproduces it.

Debian's fuse.h is protocol 7.38; the kernel speaks a newer minor.  Constants of
7.39 and later are defined here from the upstream header and marked ``# 7.NN``.
Fields renamed after 7.38 (``fuse_open_out.padding`` became ``backing_id``,
``fuse_init_out.unused[0]`` became ``max_stack_depth``) are listed in
:data:`NEWER_FIELDS`, so the C check skips their names but still checks sizes.

A request on /dev/fuse is one read(2)::

    fuse_in_header (40 bytes) | op's fixed struct | op's variable part (names, data)

A reply is one write(2)::

    fuse_out_header (16 bytes) | op's reply struct or data

A notification is a reply with ``unique == 0`` and ``error == notify code``.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 40   # the newest minor whose structures this module knows
MIN_KERNEL_MINOR = 31       # older kernels lack what the layer relies on (max_pages, killpriv_v2)
ROOT_ID = 1
MIN_READ_BUFFER = 8192

_TYPES = {"u64": "Q", "i64": "q", "u32": "I", "i32": "i", "u16": "H"}


class CStruct:
    """One C structure: its fuse.h name, its fields in order, and a ``struct.Struct``.

    ``spec`` is a C-like declaration list, e.g. ``"u64 ino; u32 mode; u32 spare[6]"``.
    """

    __slots__ = ("name", "fields", "types", "offsets", "st", "size")

    def __init__(self, name: str, spec: str) -> None:
        self.name = name
        fmt = "="
        fields: list[str] = []
        types: list[str] = []
        offsets: list[int] = []
        for decl in spec.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            ctype, field = decl.split()
            count = 1
            if field.endswith("]"):
                field, n = field[:-1].split("[")
                count = int(n)
            offsets.append(struct.calcsize(fmt))
            fmt += (str(count) if count > 1 else "") + _TYPES[ctype]
            fields.append(field)
            types.append(ctype if count == 1 else f"{ctype}[{count}]")
        self.fields = tuple(fields)
        self.types = tuple(types)
        self.offsets = tuple(offsets)
        self.st = struct.Struct(fmt)
        self.size = self.st.size

    def __repr__(self) -> str:
        return f"CStruct({self.name}, {self.size} bytes)"


# --- headers -----------------------------------------------------------------------------
IN_HEADER = CStruct("fuse_in_header", "u32 len; u32 opcode; u64 unique; u64 nodeid; u32 uid; "
                    "u32 gid; u32 pid; u16 total_extlen; u16 padding")
OUT_HEADER = CStruct("fuse_out_header", "u32 len; i32 error; u64 unique")

# --- attributes and entries --------------------------------------------------------------
ATTR = CStruct("fuse_attr", "u64 ino; u64 size; u64 blocks; u64 atime; u64 mtime; u64 ctime; "
               "u32 atimensec; u32 mtimensec; u32 ctimensec; u32 mode; u32 nlink; u32 uid; "
               "u32 gid; u32 rdev; u32 blksize; u32 flags")
ENTRY_OUT = CStruct("fuse_entry_out", "u64 nodeid; u64 generation; u64 entry_valid; "
                    "u64 attr_valid; u32 entry_valid_nsec; u32 attr_valid_nsec")  # + fuse_attr
ATTR_OUT = CStruct("fuse_attr_out", "u64 attr_valid; u32 attr_valid_nsec; u32 dummy")  # + fuse_attr
KSTATFS = CStruct("fuse_kstatfs", "u64 blocks; u64 bfree; u64 bavail; u64 files; u64 ffree; "
                  "u32 bsize; u32 namelen; u32 frsize; u32 padding; u32 spare[6]")
FILE_LOCK = CStruct("fuse_file_lock", "u64 start; u64 end; u32 type; u32 pid")

# --- per-operation request structures ----------------------------------------------------
FORGET_IN = CStruct("fuse_forget_in", "u64 nlookup")
FORGET_ONE = CStruct("fuse_forget_one", "u64 nodeid; u64 nlookup")
BATCH_FORGET_IN = CStruct("fuse_batch_forget_in", "u32 count; u32 dummy")
GETATTR_IN = CStruct("fuse_getattr_in", "u32 getattr_flags; u32 dummy; u64 fh")
MKNOD_IN = CStruct("fuse_mknod_in", "u32 mode; u32 rdev; u32 umask; u32 padding")
MKDIR_IN = CStruct("fuse_mkdir_in", "u32 mode; u32 umask")
RENAME_IN = CStruct("fuse_rename_in", "u64 newdir")
RENAME2_IN = CStruct("fuse_rename2_in", "u64 newdir; u32 flags; u32 padding")
LINK_IN = CStruct("fuse_link_in", "u64 oldnodeid")
SETATTR_IN = CStruct("fuse_setattr_in", "u32 valid; u32 padding; u64 fh; u64 size; u64 lock_owner; "
                     "u64 atime; u64 mtime; u64 ctime; u32 atimensec; u32 mtimensec; "
                     "u32 ctimensec; u32 mode; u32 unused4; u32 uid; u32 gid; u32 unused5")
OPEN_IN = CStruct("fuse_open_in", "u32 flags; u32 open_flags")
CREATE_IN = CStruct("fuse_create_in", "u32 flags; u32 mode; u32 umask; u32 open_flags")
RELEASE_IN = CStruct("fuse_release_in", "u64 fh; u32 flags; u32 release_flags; u64 lock_owner")
FLUSH_IN = CStruct("fuse_flush_in", "u64 fh; u32 unused; u32 padding; u64 lock_owner")
READ_IN = CStruct("fuse_read_in", "u64 fh; u64 offset; u32 size; u32 read_flags; u64 lock_owner; "
                  "u32 flags; u32 padding")
WRITE_IN = CStruct("fuse_write_in", "u64 fh; u64 offset; u32 size; u32 write_flags; "
                   "u64 lock_owner; u32 flags; u32 padding")
FSYNC_IN = CStruct("fuse_fsync_in", "u64 fh; u32 fsync_flags; u32 padding")
SETXATTR_IN = CStruct("fuse_setxattr_in", "u32 size; u32 flags; u32 setxattr_flags; u32 padding")
COMPAT_SETXATTR_IN_SIZE = 8  # without FUSE_SETXATTR_EXT the kernel sends only size and flags
GETXATTR_IN = CStruct("fuse_getxattr_in", "u32 size; u32 padding")
LK_IN = CStruct("fuse_lk_in", "u64 fh; u64 owner; u64 start; u64 end; u32 type; u32 pid; "
                "u32 lk_flags; u32 padding")  # fuse_file_lock lk is inlined (start..pid)
ACCESS_IN = CStruct("fuse_access_in", "u32 mask; u32 padding")
INIT_IN = CStruct("fuse_init_in", "u32 major; u32 minor; u32 max_readahead; u32 flags; "
                  "u32 flags2; u32 unused[11]")
INTERRUPT_IN = CStruct("fuse_interrupt_in", "u64 unique")
BMAP_IN = CStruct("fuse_bmap_in", "u64 block; u32 blocksize; u32 padding")
IOCTL_IN = CStruct("fuse_ioctl_in", "u64 fh; u32 flags; u32 cmd; u64 arg; u32 in_size; u32 out_size")
POLL_IN = CStruct("fuse_poll_in", "u64 fh; u64 kh; u32 flags; u32 events")
FALLOCATE_IN = CStruct("fuse_fallocate_in", "u64 fh; u64 offset; u64 length; u32 mode; u32 padding")
LSEEK_IN = CStruct("fuse_lseek_in", "u64 fh; u64 offset; u32 whence; u32 padding")
COPY_FILE_RANGE_IN = CStruct("fuse_copy_file_range_in", "u64 fh_in; u64 off_in; u64 nodeid_out; "
                             "u64 fh_out; u64 off_out; u64 len; u64 flags")
NOTIFY_RETRIEVE_IN = CStruct("fuse_notify_retrieve_in", "u64 dummy1; u64 offset; u32 size; "
                             "u32 dummy2; u64 dummy3; u64 dummy4")
SYNCFS_IN = CStruct("fuse_syncfs_in", "u64 padding")
STATX_IN = CStruct("fuse_statx_in", "u32 getattr_flags; u32 reserved; u64 fh; u32 sx_flags; "
                   "u32 sx_mask")  # 7.39

# --- per-operation reply structures ------------------------------------------------------
OPEN_OUT = CStruct("fuse_open_out", "u64 fh; u32 open_flags; i32 backing_id")
WRITE_OUT = CStruct("fuse_write_out", "u32 size; u32 padding")
GETXATTR_OUT = CStruct("fuse_getxattr_out", "u32 size; u32 padding")
LK_OUT = CStruct("fuse_lk_out", "u64 start; u64 end; u32 type; u32 pid")  # fuse_file_lock lk
INIT_OUT = CStruct("fuse_init_out", "u32 major; u32 minor; u32 max_readahead; u32 flags; "
                   "u16 max_background; u16 congestion_threshold; u32 max_write; u32 time_gran; "
                   "u16 max_pages; u16 map_alignment; u32 flags2; u32 max_stack_depth; u32 unused[6]")
BMAP_OUT = CStruct("fuse_bmap_out", "u64 block")
IOCTL_OUT = CStruct("fuse_ioctl_out", "i32 result; u32 flags; u32 in_iovs; u32 out_iovs")
POLL_OUT = CStruct("fuse_poll_out", "u32 revents; u32 padding")
LSEEK_OUT = CStruct("fuse_lseek_out", "u64 offset")
DIRENT = CStruct("fuse_dirent", "u64 ino; u64 off; u32 namelen; u32 type")  # + name, 8-aligned

# --- notifications (kernel <- daemon, unique 0) ------------------------------------------
NOTIFY_INVAL_INODE_OUT = CStruct("fuse_notify_inval_inode_out", "u64 ino; i64 off; i64 len")
NOTIFY_INVAL_ENTRY_OUT = CStruct("fuse_notify_inval_entry_out", "u64 parent; u32 namelen; u32 flags")
NOTIFY_DELETE_OUT = CStruct("fuse_notify_delete_out", "u64 parent; u64 child; u32 namelen; "
                            "u32 padding")
# 7.45, not in Debian's header: followed by ``count`` u64 node ids
NOTIFY_PRUNE_OUT = CStruct("fuse_notify_prune_out", "u32 count; u32 padding; u64 spare")

ALL_STRUCTS = [v for v in list(globals().values()) if isinstance(v, CStruct)]

# Structures whose C names differ from Debian's 7.38 header: fields renamed later, or
# structures that fuse.h composes (fuse_lk_in embeds fuse_file_lock; entry/attr_out end in
# fuse_attr).  The C check maps or skips these.
NEWER_FIELDS = {("fuse_open_out", "backing_id"): "padding",
                ("fuse_init_out", "max_stack_depth"): "unused[0]",
                ("fuse_init_out", "unused"): "unused[1]"}
NEWER_STRUCTS = {"fuse_statx_in", "fuse_notify_prune_out"}
INLINED = {"fuse_lk_in": {"start": "lk.start", "end": "lk.end", "type": "lk.type", "pid": "lk.pid"},
           "fuse_lk_out": {"start": "lk.start", "end": "lk.end", "type": "lk.type", "pid": "lk.pid"}}
# fuse_entry_out / fuse_attr_out as declared above stop where struct fuse_attr begins.
TRAILING_ATTR = {"fuse_entry_out", "fuse_attr_out"}

# --- opcodes -----------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2   # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42   # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48   # DAX only
REMOVEMAPPING = 49  # DAX only
SYNCFS = 50
TMPFILE = 51
STATX = 52          # 7.39

_OPCODE_LIST = ("LOOKUP FORGET GETATTR SETATTR READLINK SYMLINK MKNOD MKDIR UNLINK RMDIR RENAME LINK "
                "OPEN READ WRITE STATFS RELEASE FSYNC SETXATTR GETXATTR LISTXATTR REMOVEXATTR FLUSH "
                "INIT OPENDIR READDIR RELEASEDIR FSYNCDIR GETLK SETLK SETLKW ACCESS CREATE INTERRUPT "
                "BMAP DESTROY IOCTL POLL NOTIFY_REPLY BATCH_FORGET FALLOCATE READDIRPLUS RENAME2 "
                "LSEEK COPY_FILE_RANGE SETUPMAPPING REMOVEMAPPING SYNCFS TMPFILE STATX")
OPCODE_NAMES: dict[int, str] = {globals()[n]: n.lower() for n in _OPCODE_LIST.split()}

# --- notify codes ------------------------------------------------------------------------
NOTIFY_POLL = 1
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4
NOTIFY_RETRIEVE = 5
NOTIFY_DELETE = 6
NOTIFY_RESEND = 7  # 7.40
NOTIFY_PRUNE = 9  # 7.45: drop the kernel's unused dentries of these inodes (then FORGETs follow)

# --- INIT flags (flags | flags2 << 32) ---------------------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36  # 7.39
PASSTHROUGH = 1 << 37           # 7.40
NO_EXPORT_SUPPORT = 1 << 38     # 7.40
HAS_RESEND = 1 << 39            # 7.40
ALLOW_IDMAP = 1 << 40           # 7.40

# --- FOPEN_* (open_out.open_flags) -------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7      # 7.40

# --- FATTR_* (setattr_in.valid) ----------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# --- smaller flag sets -------------------------------------------------------------------
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
GETATTR_FH = 1 << 0
LK_FLOCK = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1
FSYNC_FDATASYNC = 1 << 0
OPEN_KILL_SUIDGID = 1 << 0
EXPIRE_ONLY = 1 << 0
POLL_SCHEDULE_NOTIFY = 1 << 0
UNIQUE_RESEND = 1 << 63         # 7.40: set in in_header.unique of a resent request
INT_REQ_BIT = 1                 # kernel: an INTERRUPT's own unique is the target's | 1
