"""SIF files checked against the Sylabs reference siftool (the independent oracle), squashfs readers
and a SIF assembled by siftool itself from the same objects."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from dockertools import busybox_layer
from ocitools import T, build_image, image_layout, make_tar
from siftools import hpcconv, sif_header, sif_info, sif_list, sift, siftool, squashfs_tree  # noqa: F401

from hpcconv.emit import sif


@pytest.fixture(scope="module")
def multilayer(busybox_amd64, deb_cache, tmp_path_factory):
    """A three-layer amd64 image as an OCI layout: busybox, an app layer, a layer deleting and adding."""
    app = make_tar([T("opt", "dir"), T("opt/app", "dir", mode=0o700), T("opt/app/data", data=b"secret\n", mode=0o600),
                    T("opt/app/run", data=b"#!/bin/sh\necho run\n", mode=0o700),
                    T("opt/app/link", "hard", link="opt/app/data"), T("etc/shadow", data=b"root:*:1::::::\n", mode=0o600),
                    T(".singularity.d", "dir"), T(".singularity.d/runscript", data=b"#!/bin/sh\necho stale\n", mode=0o755),
                    T("singularity", "sym", link="/somewhere/else"),
                    # names and attributes the tar -> squashfs path must keep
                    T("odd", "dir"), T("odd/sp ace", data=b"1"), T("odd/new\nline", data=b"2"),
                    T("odd/\udcff\udcfebin", data=b"3"), T("odd/\u00fcn\u00efcode", data=b"4"), T("odd/" + "d" * 120, "dir"),
                    T("odd/" + "d" * 120 + "/" + "f" * 150, data=b"5"), T("odd/longlink", "sym", link="x" * 300),
                    T("odd/hl", "hard", link="odd/sp ace"), T("odd/bigid", data=b"6", uid=3000000, gid=3000001),
                    T("odd/suid", data=b"7", mode=0o4755), T("odd/fifo", "fifo"), T("odd/null", "char", major=1, minor=3),
                    T("odd/xa", data=b"8", pax={"SCHILY.xattr.user.k": "v"})])
    top = make_tar([T("opt/app/.wh.run"), T("opt/app/new", data=b"new\n", mode=0o644), T("etc/hosts", data=b"1.2.3.4 x\n")])
    img = build_image([busybox_layer("amd64", deb_cache), app, top],
                      config={"Entrypoint": ["/bin/echo"], "Cmd": ["hello"], "Labels": {"a": "<b&c>"}})
    d = tmp_path_factory.mktemp("oci") / "img"
    image_layout(d, img, "v1")
    return d, img


def convert(src: str, out: Path, *extra: str, env: dict | None = None):
    return hpcconv("--json", "convert", src, "--target", "singularity", "-o", str(out), *extra,
                   env={"SOURCE_DATE_EPOCH": "0", **(env or {})})


def test_siftool_lists_multilayer_sif(siftool, multilayer, tmp_path, store_dir):
    layout, img = multilayer
    out = tmp_path / "img.sif"
    r = convert(f"oci:{layout}:v1", out)
    res = json.loads(r.stdout)
    assert res["target"] == "singularity" and res["format"] == "sif"
    rows = sif_list(siftool, out)
    assert [r["type"] for r in rows] == ["Def.FILE", "JSON.Generic", "JSON.Generic", "FS (Squashfs/*System/amd64)"]
    assert all(r["group"] == "1" and r["link"] == "NONE" for r in rows)
    assert rows[0]["start"] == 32176                       # data right after the 48 x 585 descriptor table
    assert rows[1]["start"] == rows[0]["end"] and rows[2]["start"] == rows[1]["end"]   # packed
    part = rows[3]
    assert part["start"] % 4096 == 0 and part["start"] - rows[2]["end"] < 4096
    assert part["end"] == out.stat().st_size                # the file ends at the end of the partition
    hdr = sif_header(siftool, out)
    assert hdr["Launch Script"] == "#!/usr/bin/env run-singularity"
    assert hdr["Version"] == "01" and hdr["Primary Architecture"] == "amd64"
    assert hdr["Descriptors Total"] == "48" and hdr["Descriptors Free"] == "44"
    assert hdr["Descriptors Offset"] == "4096" and hdr["Data Offset"] == "32176"
    assert "ID" not in hdr                                  # nil UUID with SOURCE_DATE_EPOCH
    assert hdr["Created At"].startswith("1970-01-01 00:00:00")
    names = [sif_info(siftool, i, out).get("Name") for i in (2, 3)]
    assert names == ["inspect-metadata.json", "oci-config.json"]
    info = sif_info(siftool, 4, out)
    assert (info["Filesystem Type"], info["Partition Type"], info["Architecture"]) == ("Squashfs", "*System", "amd64")
    assert int(info["Offset"]) == part["start"]
    assert os.stat(out).st_mode & 0o111                     # executable, like Apptainer's SIF files

    deff = sift(siftool, "dump", "1", str(out))
    assert deff.startswith(f"bootstrap: oci\nfrom: {layout}:v1\n\n")
    assert img.digest in deff
    meta = json.loads(sift(siftool, "dump", "2", str(out)))
    attrs = meta["data"]["attributes"]
    assert meta["type"] == "container"
    assert attrs["labels"]["a"] == "<b&c>" and attrs["labels"]["org.label-schema.schema-version"] == "1.0"
    assert 'eval "set ${SINGULARITY_OCI_RUN}"' in attrs["runscript"].splitlines()
    assert "export PATH=" in attrs["environment"]["/.singularity.d/env/10-docker2singularity.sh"]
    raw_cfg = sift(siftool, "dump", "3", str(out), binary=True)
    assert b"\\u003cb\\u0026c\\u003e" in raw_cfg            # Go's HTML-safe escaping, as Apptainer stores it
    cfg = json.loads(raw_cfg)
    assert cfg["Entrypoint"] == ["/bin/echo"] and cfg["Cmd"] == ["hello"]
    assert list(cfg) == ["Cmd", "Entrypoint", "Env", "Labels"]   # ggcr v1.Config field order

    # the dumped partition is our squashfs byte for byte, and a valid squashfs
    dumped = sift(siftool, "dump", "4", str(out), binary=True)
    with open(out, "rb") as f:
        f.seek(part["start"])
        assert f.read() == dumped
    assert dumped[:4] == b"hsqs"
    (tmp_path / "p.sqfs").write_bytes(dumped)
    s = subprocess.run([need("unsquashfs"), "-s", str(tmp_path / "p.sqfs")], capture_output=True, text=True)
    assert s.returncode == 0 and "Compression gzip" in s.stdout


def _flattened(src: str, tmp_path: Path) -> dict:
    """The flattened rootfs as `hpcconv export --raw` writes it."""
    tar = tmp_path / "flat.tar"
    hpcconv("export", src, "--raw", "-o", str(tar))
    from siftools import tar_tree
    return tar_tree(tar.read_bytes())


def _resolve_hardlinks(tree: dict) -> dict:
    out = {}
    for p, d in tree.items():
        if d["type"] == "hardlink":
            t = tree[d["link"].strip("/").removeprefix("./")]
            d = {**t}
        out[p] = d
    return out


@pytest.mark.parametrize("epoch", ["0", None])
def test_partition_tree_matches_flattened_rootfs(siftool, multilayer, tmp_path, store_dir, epoch, monkeypatch):
    """Same paths, types, owners, contents, link targets, xattrs; modes only gain a+rX; mtimes are
    kept, except that SOURCE_DATE_EPOCH clamps newer ones (mksquashfs's rule, as under Apptainer)."""
    layout, _ = multilayer
    src = f"oci:{layout}:v1"
    out = tmp_path / "img.sif"
    if epoch is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
        hpcconv("-q", "convert", src, "--target", "singularity", "-o", str(out),
                env={"SOURCE_DATE_EPOCH": ""})
    else:
        convert(src, out, env={"SOURCE_DATE_EPOCH": epoch})
    dumped = tmp_path / "part.sqfs"
    dumped.write_bytes(sift(siftool, "dump", "4", str(out), binary=True))
    got = _resolve_hardlinks(squashfs_tree(dumped))
    flat = _resolve_hardlinks(_flattened(src, tmp_path))

    replaced = {"etc/hosts", ".singularity.d/runscript", "singularity"}
    for p, d in flat.items():
        assert p in got, f"/{p} from the flattened rootfs is missing from the SIF"
        g = got[p]
        if p in replaced:
            continue
        assert g["type"] == d["type"], p
        assert (g["uid"], g["gid"]) == (d["uid"], d["gid"]), p
        assert g["link"] == d["link"] or d["type"] != "symlink", p
        assert g.get("sha256") == d.get("sha256"), p
        assert g["xattrs"] == d["xattrs"], p
        assert g["mtime"] == (d["mtime"] if epoch is None else min(d["mtime"], int(epoch))), p
        if d["type"] in ("file", "dir") and p != "etc/shadow":
            # a+rX: world-readable, directories/executables world-searchable; nothing else changes
            want = d["mode"] | 0o444 | (0o111 if d["type"] == "dir" or d["mode"] & 0o111 else 0)
            assert g["mode"] == want, (p, oct(g["mode"]), oct(want))
        else:
            assert g["mode"] == d["mode"], p
    assert got["etc/shadow"]["mode"] == 0o600               # secrets stay private
    assert got["opt/app/data"]["mode"] == 0o644 and got["opt/app"]["mode"] == 0o755
    assert "opt/app/run" not in got and got["opt/app/new"]["type"] == "file"
    assert got["etc/hosts"]["type"] == "file"
    assert got["etc/hosts"]["sha256"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # empty

    extra = set(got) - set(flat)
    expected = {".singularity.d/libs", ".singularity.d/actions", ".singularity.d/env", "dev", "proc", "sys", "home", "var/tmp",
                ".singularity.d/startscript", ".singularity.d/labels.json", ".singularity.d/Singularity",
                ".singularity.d/env/10-docker2singularity.sh", "etc/resolv.conf",
                ".run", ".exec", ".test", ".shell", "environment"} | \
               {f".singularity.d/actions/{a}" for a in ("exec", "run", "shell", "start", "test")} | \
               {f".singularity.d/env/{e}" for e in ("01-base.sh", "90-environment.sh", "94-appsbase.sh", "95-apps.sh",
                                                     "99-base.sh", "99-runtimevars.sh")}
    assert extra == expected
    assert got["singularity"] == {**got["singularity"], "type": "symlink", "link": ".singularity.d/runscript"}
    assert got["environment"]["link"] == ".singularity.d/env/90-environment.sh"
    assert got[".singularity.d/runscript"]["mode"] == 0o755


def test_arm64_sif(siftool, busybox_arm64, tmp_path, store_dir):
    d = image_layout(tmp_path / "arm", busybox_arm64)
    out = tmp_path / "arm.sif"
    convert(f"oci:{d}", out, "--platform", "linux/arm64")
    assert sif_list(siftool, out)[-1]["type"] == "FS (Squashfs/*System/arm64)"
    assert sif_header(siftool, out)["Primary Architecture"] == "arm64"


def test_arch_comes_from_the_binaries_not_the_config(siftool, deb_cache, tmp_path, store_dir):
    """An image whose config claims amd64 but whose /bin/sh is an arm64 ELF: the SIF says arm64
    (that is what Apptainer checks against the host before running) and the check warns."""
    img = build_image([busybox_layer("arm64", deb_cache)], arch="amd64")
    d = image_layout(tmp_path / "lying", img)
    out = tmp_path / "lying.sif"
    res = json.loads(convert(f"oci:{d}", out, "--platform", "linux/amd64").stdout)
    assert sif_header(siftool, out)["Primary Architecture"] == "arm64"
    chk = [c for c in res["checks"] if c["name"] == "sif architecture"][0]
    assert chk["status"] == "warn" and "arm64" in chk["detail"] and "/bin/sh" in chk["detail"]


def test_deterministic_with_source_date_epoch(siftool, multilayer, tmp_path, store_dir):
    layout, _ = multilayer
    a, b = tmp_path / "a.sif", tmp_path / "b.sif"
    convert(f"oci:{layout}:v1", a)
    convert(f"oci:{layout}:v1", b)
    assert a.read_bytes() == b.read_bytes()
    # without SOURCE_DATE_EPOCH each SIF gets a random UUID, as Apptainer's
    c, e = tmp_path / "c.sif", tmp_path / "e.sif"
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    for p in (c, e):
        r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "-q", "convert", f"oci:{layout}:v1", "--target",
                            "singularity", "-o", str(p)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    hc, he = sif_header(siftool, c), sif_header(siftool, e)
    assert hc["ID"] != he["ID"]


def test_zstd_partition(siftool, multilayer, tmp_path, store_dir):
    layout, _ = multilayer
    out = tmp_path / "z.sif"
    convert(f"oci:{layout}:v1", out, "--compression", "zstd")
    p = tmp_path / "z.sqfs"
    p.write_bytes(sift(siftool, "dump", "4", str(out), binary=True))
    s = subprocess.run([need("unsquashfs"), "-s", str(p)], capture_output=True, text=True)
    assert "Compression zstd" in s.stdout


def test_existing_output_refused_without_force(multilayer, tmp_path, store_dir):
    layout, _ = multilayer
    out = tmp_path / "x.sif"
    out.write_bytes(b"keep")
    r = hpcconv("convert", f"oci:{layout}:v1", "--target", "singularity", "-o", str(out), check=False)
    assert r.returncode == 2 and out.read_bytes() == b"keep"
    r = hpcconv("convert", f"oci:{layout}:v1", "--target", "singularity", "--format", "tar", "-o",
                str(tmp_path / "y"), check=False)
    assert r.returncode == 2 and "not a singularity format" in r.stderr


def test_layout_matches_a_sif_assembled_by_siftool(siftool, multilayer, tmp_path, store_dir):
    """siftool itself builds a SIF from the objects we wrote (same order, group 1, primary partition):
    apart from the UUID, the times and the launch script (siftool's `new` writes neither), the two
    files must be identical byte for byte, so every offset, size, padding and count is the library's."""
    layout, _ = multilayer
    ours = tmp_path / "ours.sif"
    convert(f"oci:{layout}:v1", ours)
    objs = []
    for i in (1, 2, 3, 4):
        p = tmp_path / f"obj{i}"
        p.write_bytes(sift(siftool, "dump", str(i), str(ours), binary=True))
        objs.append(p)
    ref = tmp_path / "ref.sif"
    sift(siftool, "new", str(ref))
    sift(siftool, "add", str(ref), str(objs[0]), "--datatype", "1", "--groupid", "1")
    sift(siftool, "add", str(ref), str(objs[1]), "--datatype", "6", "--groupid", "1", "--filename",
         "inspect-metadata.json")
    sift(siftool, "add", str(ref), str(objs[2]), "--datatype", "6", "--groupid", "1", "--filename", "oci-config.json")
    sift(siftool, "add", str(ref), str(objs[3]), "--datatype", "4", "--parttype", "2", "--partfs", "1",
         "--partarch", "2", "--groupid", "1")
    a, b = bytearray(ours.read_bytes()), bytearray(ref.read_bytes())
    assert len(a) == len(b)

    def mask(buf: bytearray, deffile_name: bool):
        buf[0:32] = bytes(32)                  # launch script
        buf[48:80] = bytes(32)                 # uuid, created, modified
        for i in range(48):
            o = 4096 + i * 585
            buf[o + 41:o + 57] = bytes(16)     # descriptor created/modified
            if i == 0 and deffile_name:
                buf[o + 73:o + 201] = bytes(128)   # siftool names the deffile after the input file
        return buf

    assert mask(a, True) == mask(b, True)


def test_place_matches_the_reference_layout():
    """The worked example in docs/reference/sif-and-apptainer.md A.8, made by siftool: a 37-byte
    deffile, a 45-byte JSON object and a 4096-byte squashfs."""
    objs = [sif.DataObject(sif.DT_DEFFILE, b"x" * 37), sif.DataObject(sif.DT_LABELS, b"y" * 45),
            sif.DataObject(sif.DT_PARTITION, align=4096, size=4096)]
    placed = sif.place(objs)
    assert [(p.offset, p.padded) for p in placed] == [(32176, 37), (32213, 45), (32768, 4606)]
    head = sif.pack_header(placed, b"02\0", bytes(16), 0, 0)
    fields = struct.unpack("<32s10s3s3s16s8q", head)
    assert fields[7:] == (45, 48, 4096, 28080, 32176, 4688)
