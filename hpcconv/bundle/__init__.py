"""Offline bundles for air-gapped centres (`hpcconv bundle create|verify|import|diff|keygen`).

A bundle is a tar container, written as one file `NAME.hpcbundle` or as numbered parts
`NAME.hpcbundle.part001...` of at most SIZE bytes each (plain byte ranges: `cat` of the parts is the
single-file bundle), plus, when split, `NAME.hpcbundle.part000`: the part list.

Container members, in order:

    tool/...                 with --with-tool: wheelhouse, requirements with hashes, install.sh
    oci-layout, index.json   an OCI image layout: one index.json entry per image, tagged with its ref
    blobs/sha256/<hex>[.zst] each blob once, whatever number of images share it; zstd (`.zst`) only
                             where it saves 10 % or more (compressed layers are stored as they are)
    outputs/<name>[.zst]     with --include-outputs: converted images (a directory travels as NAME.tar)
    hpcbundle.json           the manifest, last: every member with size and sha256 (blobs also with
                             digest, size and media type), the images with their carried platforms,
                             and for an incremental bundle its bases and the blobs it requires

Sealed documents (`hpcbundle.json`, part000): the JSON body followed by one seal line
`{"hpcbundle-seal":1,"sha256":..,"size":..,"signature":{..}}`; the sha256 covers every byte of the
body, the optional Ed25519 signature covers a domain string plus the body. part000's body lists
every part (index, name, offset, size, sha256), the container's size and sha256, and embeds the
manifest (whose sha256 must equal the one in the container), so dropped, added, swapped or damaged
parts are each named, and part000 alone is enough for `create --since`.
"""
