"""Sinks: tar, squashfs and directory outputs from hand-made entry streams.

Oracles: GNU tar, `sqfs2tar` / `unsquashfs -lls` (squashfs-tools-ng / squashfs-tools), os.lstat of
the written tree. Hostile streams must never write outside the output.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import need
from ocitools import T, make_tar

from hpcconv.emit import sinks
from hpcconv.emit.sinks import OutputError, write_dir, write_squashfs, write_tar
from hpcconv.entries import DIR, FILE, HARDLINK, SYMLINK, Entry, read_tar_entries
from hpcconv.errors import CorruptInput, UnsafeInput, UsageError

BIG = os.urandom(3 << 20)
MEMBERS = [
    T("bin", "dir"), T("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o755),
    T("etc", "dir"), T("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n"),
    T("ro", "dir", mode=0o555), T("ro/inside", data=b"in a read-only dir", mode=0o444),
    T("data", "dir"), T("data/big", data=BIG), T("data/hard", "hard", link="data/big"),
    T("abs", "sym", link="/etc/passwd"), T("rel", "sym", link="etc/passwd"),
    T("dangling", "sym", link="/nonexistent/x"),
    T("owned", data=b"x", uid=1234, gid=5678, mode=0o640),
    T("sticky", "dir", mode=0o1777),
    T("caps", data=b"c", pax={"SCHILY.xattr.user.test": "v1"}),
]
TAR = make_tar(MEMBERS)


def stream(data: bytes = TAR):
    return read_tar_entries(io.BytesIO(data))


def tar_tree(data: bytes) -> dict:
    """path -> (type, mode, uid, gid, size/link, content sha) from a tar, via Python tarfile."""
    import hashlib

    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for ti in tf:
            name = ti.name.lstrip("./").rstrip("/")
            if not name:
                continue
            content = hashlib.sha256(tf.extractfile(ti).read()).hexdigest() if ti.isfile() else ""
            kind = "dir" if ti.isdir() else "sym" if ti.issym() else "hard" if ti.islnk() else "file" if ti.isfile() else "other"
            mode = 0o777 if ti.issym() else ti.mode & 0o7777   # symlink modes mean nothing on Linux
            out[name] = (kind, mode, ti.uid, ti.gid, ti.linkname if (ti.issym() or ti.islnk()) else "", content)
    return out


EXPECTED = tar_tree(TAR)


@pytest.fixture(params=["hpcconv", "external"])
def builder(request, monkeypatch):
    """Each SquashFS test runs with hpcconv's own writer and with tar2sqfs."""
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", request.param)
    return request.param


def no_temps(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if ".hpcconv-" in p.name]


# tar -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression,level", [(None, None), ("gzip", None), ("gzip", 9), ("gzip", 1),
                                               ("zstd", None), ("zstd", 12)])
def test_write_tar_round_trip(tmp_path, compression, level):
    out = tmp_path / "out.tar"
    assert write_tar(stream(), out, compression=compression, level=level) == len(MEMBERS)
    raw = out.read_bytes()
    if compression == "gzip":
        assert raw[:2] == b"\x1f\x8b"
        raw = subprocess.run(["gzip", "-dc"], input=raw, capture_output=True, check=True).stdout
    elif compression == "zstd":
        import zstandard

        assert raw[:4] == b"\x28\xb5\x2f\xfd"
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    assert tar_tree(raw) == EXPECTED
    # GNU tar reads it too
    listing = subprocess.run(["tar", "-tvf", "-"], input=raw, capture_output=True, check=True).stdout.decode()
    assert "data/hard link to data/big" in listing and "abs -> /etc/passwd" in listing
    no_temps(tmp_path)


def test_write_tar_refuses_existing_and_force(tmp_path):
    out = tmp_path / "out.tar"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="already exists"):
        write_tar(stream(), out)
    assert out.read_bytes() == b"old"
    write_tar(stream(), out, force=True)
    assert tar_tree(out.read_bytes()) == EXPECTED


def _failing(after: int):
    for i, e in enumerate(stream()):
        if i == after:
            raise CorruptInput("layer went bad")
        yield e


@pytest.mark.parametrize("kind", ["tar", "squashfs", "dir"])
def test_error_mid_stream_leaves_nothing(tmp_path, kind):
    if kind == "squashfs":
        need("tar2sqfs")
    out = tmp_path / "out"
    fn = {"tar": write_tar, "squashfs": write_squashfs, "dir": write_dir}[kind]
    with pytest.raises(CorruptInput):
        fn(_failing(9), out)
    assert not out.exists()
    no_temps(tmp_path)
    # with --force an existing output survives a failed replacement
    out.mkdir() if kind == "dir" else out.write_bytes(b"old")
    with pytest.raises(CorruptInput):
        fn(_failing(9), out, force=True)
    assert (out.is_dir() if kind == "dir" else out.read_bytes() == b"old")
    no_temps(tmp_path)


def test_short_file_content_is_an_error(tmp_path):
    e = Entry("f", FILE, 0o644, size=10, reader=io.BytesIO(b"abc"))
    for fn, out in ((write_tar, tmp_path / "t.tar"), (write_dir, tmp_path / "d")):
        with pytest.raises((CorruptInput, OutputError, OSError)):
            fn(iter([e.with_(reader=io.BytesIO(b"abc"))]), out)
        assert not out.exists()
    no_temps(tmp_path)


def test_enospc_is_a_clear_error(tmp_path, builder):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(OutputError, match="disk full"):
            write_tar(stream(), mnt / "out.tar")
        with pytest.raises(OutputError, match="disk full"):
            write_dir(stream(), mnt / "outdir")
        if sinks._which("tar2sqfs"):
            big = make_tar([T("r", data=os.urandom(2 << 20))])
            with pytest.raises(OutputError, match="disk full" if builder == "hpcconv" else "disk full|failed"):
                write_squashfs(stream(big), mnt / "out.sqfs")
        assert sorted(os.listdir(mnt)) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# squashfs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_write_squashfs_read_back_with_sqfs2tar(tmp_path, compression, builder):
    need("tar2sqfs")
    sqfs2tar = need("sqfs2tar")
    out = tmp_path / "img.sqfs"
    assert write_squashfs(stream(), out, compression=compression) == len(MEMBERS)
    assert out.read_bytes()[:4] == b"hsqs"
    back = subprocess.run([sqfs2tar, str(out)], capture_output=True, check=True).stdout
    got = tar_tree(back)
    # sqfs2tar writes the second name of a hardlinked inode as a hardlink to the first
    assert got == EXPECTED
    # the compressor is the one asked for (unsquashfs -s is an independent reader)
    info = subprocess.run([need("unsquashfs"), "-s", str(out)], capture_output=True, text=True, check=True).stdout
    assert f"Compression {compression}" in info
    assert "compression-level 6" in info          # our default, not the tools' 9 (gzip) / 15 (zstd)
    assert "Block size 1048576" in info
    no_temps(tmp_path)


def test_write_squashfs_is_reproducible_and_lists(tmp_path, builder):
    need("tar2sqfs")
    a, b = tmp_path / "a.sqfs", tmp_path / "b.sqfs"
    write_squashfs(stream(), a, compression="zstd")
    write_squashfs(stream(), b, compression="zstd")
    assert a.read_bytes() == b.read_bytes()
    lls = subprocess.run([need("unsquashfs"), "-lls", str(a)], capture_output=True, text=True, check=True).stdout
    assert "squashfs-root/abs -> /etc/passwd" in lls
    assert "drwxrwxrwt" in lls and "1234/5678" in lls   # sticky dir kept, numeric owners from the stream


def test_write_squashfs_charliecloud_block_size(tmp_path, builder):
    need("tar2sqfs")
    out = tmp_path / "c.sqfs"
    write_squashfs(stream(), out, compression="gzip", block_size=65536)
    info = subprocess.run([need("unsquashfs"), "-s", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Block size 65536" in info


def test_write_squashfs_any_entry_order(tmp_path, builder):
    """A directory entry after its children (how the Charliecloud emitter appends) still sets its mode."""
    need("tar2sqfs")
    data = make_tar([T("a/b/f", data=b"x"), T("a", "dir", mode=0o711), T("a/b", "dir", mode=0o750)])
    out = tmp_path / "o.sqfs"
    write_squashfs(stream(data), out)
    back = tar_tree(subprocess.run([need("sqfs2tar"), str(out)], capture_output=True, check=True).stdout)
    assert back["a"][1] == 0o711 and back["a/b"][1] == 0o750 and back["a/b/f"][0] == "file"


# dir -----------------------------------------------------------------------------------------------------
def dir_tree(root: Path) -> dict:
    import hashlib

    out = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, "", "")
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("sym", 0o777, st.st_uid, st.st_gid, os.readlink(full), "")
            else:
                content = hashlib.sha256(open(full, "rb").read()).hexdigest()
                if st.st_nlink > 1 and st.st_ino in inodes:
                    out[rel] = ("hard", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, inodes[st.st_ino], "")
                else:
                    inodes[st.st_ino] = rel
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, "", content)
    return out


def test_write_dir_tree(tmp_path):
    out = tmp_path / "root"
    assert write_dir(stream(), out) == len(MEMBERS)
    got = dir_tree(out)
    exp = {k: v for k, v in EXPECTED.items()}
    # tar stores a hardlink without mode/content; on disk it is the same inode as its target
    exp["data/hard"] = ("hard", 0o644, 0, 0, "data/big", "")
    for k, v in exp.items():
        if v[0] == "sym":
            exp[k] = ("sym", 0o777, 0, 0, v[4], "")
    if os.geteuid() != 0:
        pytest.skip("ownership checks need root")
    assert got == exp
    assert os.lstat(out / "data/big").st_ino == os.lstat(out / "data/hard").st_ino
    assert os.getxattr(out / "caps", "user.test") == b"v1"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    no_temps(tmp_path)


def test_write_dir_refuses_existing(tmp_path):
    out = tmp_path / "root"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UsageError):
        write_dir(stream(), out)
    assert (out / "keep").exists()
    write_dir(stream(), out, force=True)
    assert not (out / "keep").exists() and (out / "data" / "big").stat().st_size == len(BIG)
    no_temps(tmp_path)


@pytest.fixture
def canary(tmp_path) -> Path:
    c = tmp_path / "outside"
    c.mkdir()
    (c / "precious").write_text("keep")
    return c


def _hostile_cases(canary: Path):
    d = lambda p: Entry(p, DIR, 0o755)  # noqa: E731
    f = lambda p, data=b"pwned": Entry(p, FILE, 0o644, size=len(data), reader=io.BytesIO(data))  # noqa: E731
    return {
        "symlink-parent": [d("a"), Entry("x", SYMLINK, 0o777, linkname=str(canary)), f("x/pwned")],
        "symlink-parent-relative": [Entry("x", SYMLINK, 0o777, linkname="../outside"), f("x/pwned")],
        "symlink-parent-deep": [d("a"), Entry("a/x", SYMLINK, 0o777, linkname=str(canary)), d("a/x/sub"),
                                f("a/x/sub/pwned")],
        "dotdot": [d("a"), f("a/../../outside/pwned")],
        "dotdot-link": [Entry("up", HARDLINK, 0o644, linkname="../outside/precious")],
        "absolute-hardlink": [Entry("pw", HARDLINK, 0o644, linkname="/etc/passwd")],
        "hardlink-through-symlink": [Entry("x", SYMLINK, 0o777, linkname=str(canary)),
                                     Entry("h", HARDLINK, 0o644, linkname="x/precious")],
        "replace-symlink-then-write": [Entry("x", SYMLINK, 0o777, linkname=str(canary / "precious")),
                                       f("x", b"overwritten?")],
    }


@pytest.mark.parametrize("case", ["symlink-parent", "symlink-parent-relative", "symlink-parent-deep", "dotdot",
                                  "dotdot-link", "absolute-hardlink", "hardlink-through-symlink",
                                  "replace-symlink-then-write"])
def test_write_dir_hostile_stream(tmp_path, canary, case):
    out = tmp_path / "root"
    entries = _hostile_cases(canary)[case]
    passwd = Path("/etc/passwd")
    before = (passwd.stat().st_nlink, passwd.read_bytes())
    try:
        write_dir(iter(entries), out)
        finished = True
    except (UnsafeInput, CorruptInput) as e:
        finished = False
        assert e.exit_code == 4 and "\n" not in e.message
    # whatever happened, nothing changed outside OUT
    assert sorted(os.listdir(canary)) == ["precious"] and (canary / "precious").read_text() == "keep"
    assert (passwd.stat().st_nlink, passwd.read_bytes()) == before
    if finished:
        # only the symlink-replacing case may legitimately succeed: the file replaces the link
        assert case == "replace-symlink-then-write"
        assert (out / "x").read_bytes() == b"overwritten?" and not (out / "x").is_symlink()
    else:
        assert not out.exists()
    no_temps(tmp_path)


def test_write_dir_hardlink_to_image_passwd_stays_inside(tmp_path):
    out = tmp_path / "root"
    entries = [Entry("etc", DIR, 0o755), Entry("etc/passwd", FILE, 0o644, size=3, reader=io.BytesIO(b"img")),
               Entry("pw", HARDLINK, 0o644, linkname="/etc/passwd")]
    write_dir(iter(entries), out)
    assert os.lstat(out / "pw").st_ino == os.lstat(out / "etc/passwd").st_ino
    assert os.lstat(out / "pw").st_ino != os.lstat("/etc/passwd").st_ino
    assert (out / "pw").read_bytes() == b"img"


def _odd_entries():
    bad = os.fsdecode(b"caf\xe9")          # not UTF-8: kept as the original bytes
    long = "d" * 120
    return [Entry("a", DIR, 0o755), Entry("a/" + bad, FILE, 0o644, size=2, reader=io.BytesIO(b"hi")),
            Entry("a/" + long, DIR, 0o755),
            Entry(f"a/{long}/" + "f" * 150, FILE, 0o644, size=1, reader=io.BytesIO(b"x")),
            Entry("s", SYMLINK, 0o777, linkname="/" + "t" * 200), Entry("h", HARDLINK, linkname="a/" + bad),
            Entry("sp ace\nnl", FILE, 0o644, size=0, reader=io.BytesIO(b""))]


def test_odd_names_in_every_format(tmp_path, builder):
    """Non-UTF-8 bytes, >100-byte names and link targets, newlines: byte-exact in all outputs."""
    need("tar2sqfs")
    expected = {b"a", b"a/caf\xe9", b"a/" + b"d" * 120, b"a/" + b"d" * 120 + b"/" + b"f" * 150, b"s", b"h",
                b"sp ace\nnl"}
    write_tar(iter(_odd_entries()), tmp_path / "o.tar")
    gnu = subprocess.run(["tar", "--quoting-style=literal", "-tf", str(tmp_path / "o.tar")],
                         capture_output=True, check=True).stdout
    # GNU tar prints one name per line; the newline name spans two
    assert set(n.rstrip(b"/") for n in gnu.replace(b"sp ace\nnl", b"SPACE").split(b"\n") if n) == \
        (expected - {b"sp ace\nnl"}) | {b"SPACE"}
    write_squashfs(iter(_odd_entries()), tmp_path / "o.sqfs")
    back = subprocess.run([need("sqfs2tar"), str(tmp_path / "o.sqfs")], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(back), encoding="utf-8", errors="surrogateescape") as tf:
        names = {os.fsencode(ti.name.rstrip("/")) for ti in tf}
        assert os.fsencode([ti for ti in tf if ti.name == "s"][0].linkname) == b"/" + b"t" * 200
    assert names == expected
    write_dir(iter(_odd_entries()), tmp_path / "d")
    got = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(tmp_path / "d")):
        for n in dirnames + filenames:
            got.add(os.path.relpath(os.path.join(dirpath, n), os.fsencode(tmp_path / "d")))
    assert got == expected
    assert (tmp_path / "d" / "h").read_bytes() == b"hi"


def test_write_tar_to_stdout(tmp_path):
    code = ("import io, sys; sys.path.insert(0, 'tests'); from ocitools import T, make_tar; "
            "from hpcconv.entries import read_tar_entries; from hpcconv.emit.sinks import write_tar; "
            f"n = write_tar(read_tar_entries(io.BytesIO(make_tar([T('x', data=b'abc')]))), None); "
            "sys.stderr.write(str(n))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"1"
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tf:
        assert tf.extractfile("x").read() == b"abc"


def test_mksquashfs_fallback(tmp_path, monkeypatch):
    """Without tar2sqfs, `mksquashfs - OUT -tar` builds the image (read back with sqfs2tar)."""
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", "external")
    exe = need("mksquashfs")
    if not sinks._mksquashfs_has_tar(exe):
        pytest.skip("this mksquashfs has no -tar")
    orig = sinks._which
    monkeypatch.setattr(sinks, "_which", lambda tool: None if tool == "tar2sqfs" else orig(tool))
    out = tmp_path / "fb.sqfs"
    assert write_squashfs(stream(), out, compression="zstd") == len(MEMBERS)
    back = subprocess.run([need("sqfs2tar"), str(out)], capture_output=True, check=True).stdout
    assert tar_tree(back) == EXPECTED
    info = subprocess.run([need("unsquashfs"), "-s", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Compression zstd" in info and "Block size 1048576" in info
    assert "compression-level 6" in info
    monkeypatch.setattr(sinks, "_which", lambda tool: None)
    with pytest.raises(OutputError, match="tar2sqfs"):
        write_squashfs(stream(), tmp_path / "none.sqfs")
    assert not (tmp_path / "none.sqfs").exists()
    no_temps(tmp_path)


def test_force_replaces_across_types_without_following(tmp_path, canary):
    out = tmp_path / "out"
    out.write_bytes(b"old file")
    write_dir(stream(), out, force=True)                 # file -> dir
    assert (out / "etc" / "passwd").is_file()
    write_tar(stream(), out, force=True)                 # dir -> file
    assert tar_tree(out.read_bytes()) == EXPECTED
    link = tmp_path / "link"
    link.symlink_to(canary)
    write_dir(stream(), link, force=True)                # a symlink output is replaced, not followed
    assert not link.is_symlink() and (link / "etc" / "passwd").is_file()
    assert sorted(os.listdir(canary)) == ["precious"]
    no_temps(tmp_path)


def test_an_interrupt_right_after_the_builder_starts_kills_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands just after tar2sqfs started, before the first byte went down the pipe:
    the tool is killed (not left running to write the temporary after it was removed) and nothing
    is left next to the output. The interrupt is raised where the CLI's signal handler would raise
    it (CI once caught this window with a real SIGINT; no real component hits it on demand)."""
    need("tar2sqfs")
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*a, **kw):
        started.append(real(*a, **kw))
        return started[-1]

    def interrupted(f):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(sinks, "widen_pipe", interrupted)
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", "external")
    with pytest.raises(KeyboardInterrupt):
        write_squashfs(iter([Entry("a", FILE, 0o644, size=1, reader=io.BytesIO(b"x"))]), tmp_path / "o.sqfs", "gzip")
    assert len(started) == 1 and started[0].poll() is not None     # killed and reaped
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_popen_still_kills_the_builder(sig, tmp_path, monkeypatch, cli_signals,
                                                        signal_inside_popen):
    """The window left before the test above: a SIGINT/SIGTERM that lands inside subprocess.Popen,
    after the fork. CI hit it with a real SIGTERM: the exception left Popen before anyone held the
    tool, which read end-of-input and wrote an empty image under the temporary's name after the
    unwinding had removed it. With the CLI's handler installed the signal is held until Popen
    returns, then raised where the tool is killed and reaped (real tar2sqfs, real signal)."""
    need("tar2sqfs")
    started = signal_inside_popen(sig)
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", "external")
    with pytest.raises(KeyboardInterrupt) as got:
        write_squashfs(iter([Entry("a", FILE, 0o644, size=1, reader=io.BytesIO(b"x"))]), tmp_path / "o.sqfs")
    assert isinstance(got.value, cli_signals.Terminated) == (sig == signal.SIGTERM)
    assert len(started) == 1
    try:
        os.waitpid(started[0].pid, 0)           # a tool nobody killed ends here, its image written
    except ChildProcessError:
        pass                                    # reaped by hpcconv
    assert started[0].returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) == []


def test_dir_names_do_not_depend_on_the_locale(tmp_path):
    """A directory output's names and link targets are the layer's bytes in any locale: written
    under an ASCII filesystem encoding (C locale, UTF-8 mode off: os functions given a str raised
    UnicodeEncodeError there, and wrote Latin-1 bytes in a Latin-1 locale), read back as bytes here."""
    script = """
import io, sys
from hpcconv.emit.sinks import write_dir
from hpcconv.entries import DIR, FILE, HARDLINK, SYMLINK, Entry
es = [Entry("d\\u00e9", DIR, 0o755), Entry("d\\u00e9/caf\\udce9", FILE, 0o644, size=2, reader=io.BytesIO(b"hi")),
      Entry("l\\u00e9", SYMLINK, 0o777, linkname="d\\u00e9/caf\\udce9"),
      Entry("h\\u00e9", HARDLINK, linkname="d\\u00e9/caf\\udce9")]
print(sys.getfilesystemencoding())
write_dir(iter(es), sys.argv[1])
"""
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["ascii"], r.stderr
    out = os.fsencode(tmp_path / "out")
    assert sorted(os.listdir(out)) == [b"d\xc3\xa9", b"h\xc3\xa9", b"l\xc3\xa9"]
    assert os.listdir(out + b"/d\xc3\xa9") == [b"caf\xe9"]
    assert os.readlink(out + b"/l\xc3\xa9") == b"d\xc3\xa9/caf\xe9"
    st = os.stat(out + b"/h\xc3\xa9")
    assert st.st_nlink == 2 and open(out + b"/h\xc3\xa9", "rb").read() == b"hi"
