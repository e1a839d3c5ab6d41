#!/usr/bin/env bash
# Builds an OCI image archive of the operator (the `ferry` binary) without
# a container daemon or a base image: one layer holding the binary, the
# shared libraries it links (as `ldd` finds them on this host), the CA
# bundle, /etc/passwd with an unprivileged user and /tmp.
#
#   scripts/operator-image.sh OUT.tar [--tag ferry:latest]
#   docker load -i OUT.tar     # or: podman load -i OUT.tar
#   skopeo copy oci-archive:OUT.tar docker://REGISTRY/ferry:latest
#
# The archive is an OCI image layout (oci-layout, index.json, blobs/) with
# a Docker-style manifest.json beside it, so both `docker load` and OCI
# tools read it. The layer is reproducible for one binary: sorted, owned by
# root, dated SOURCE_DATE_EPOCH (default 0).
#
# FERRY_BIN names the binary (default target/release/ferry, built with
# `cargo build --release -p ferry-cli` if missing). It is stripped of debug
# information in the image.
set -euo pipefail

usage() {
    echo "usage: $0 OUT.tar [--tag NAME:TAG]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
out=$1
shift
tag=ferry:latest
while [ $# -gt 0 ]; do
    case $1 in
    --tag)
        [ $# -ge 2 ] || usage
        tag=$2
        shift 2
        ;;
    *) usage ;;
    esac
done
case $tag in
*:*) ;;
*) tag=$tag:latest ;;
esac

root_dir=$(cd "$(dirname "$0")/.." && pwd)
bin=${FERRY_BIN:-$root_dir/target/release/ferry}
if [ ! -x "$bin" ]; then
    if [ -n "${FERRY_BIN:-}" ]; then
        echo "operator-image.sh: FERRY_BIN=$bin is not an executable" >&2
        exit 3
    fi
    echo "operator-image.sh: building $bin" >&2
    (cd "$root_dir" && cargo build --release -p ferry-cli)
fi
for tool in tar sha256sum ldd; do
    command -v $tool >/dev/null || {
        echo "operator-image.sh: $tool is missing" >&2
        exit 4
    }
done
epoch=${SOURCE_DATE_EPOCH:-0}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
layout=$work/layout
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$layout/blobs/sha256"
chmod 1777 "$rootfs/tmp"

# The binary, without its debug information.
cp "$bin" "$rootfs/usr/local/bin/ferry"
if command -v strip >/dev/null; then
    strip --strip-debug "$rootfs/usr/local/bin/ferry"
fi
chmod 0755 "$rootfs/usr/local/bin/ferry"

# The libraries it links, at the paths the loader looks for them.
ldd "$bin" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }' | sort -u |
    while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nferry:x:65532:65532:ferry:/tmp:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nferry:x:65532:\n' >"$rootfs/etc/group"

blob() { # FILE -> prints its digest, moved into the layout
    local d
    d=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$layout/blobs/sha256/$d"
    echo "$d"
}
size() { stat -c %s "$layout/blobs/sha256/$1"; }

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    --format=gnu -C "$rootfs" -cf "$work/layer.tar" .
layer=$(blob "$work/layer.tar")

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
version=$("$bin" --version 2>/dev/null | head -1 || echo ferry)
cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","created":"$created","config":{"User":"65532:65532","Env":["PATH=/usr/local/bin:/usr/bin:/bin","FERRY_STATE=/tmp/ferry","HOME=/tmp"],"Entrypoint":["/usr/local/bin/ferry"],"Cmd":["operator","run"],"WorkingDir":"/tmp","Labels":{"org.opencontainers.image.title":"ferry-operator","org.opencontainers.image.version":"$version"}},"rootfs":{"type":"layers","diff_ids":["sha256:$layer"]},"history":[{"created":"$created","created_by":"scripts/operator-image.sh"}]}
EOF
config=$(blob "$work/config.json")

cat >"$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$(size "$config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:$layer","size":$(size "$layer")}]}
EOF
manifest=$(blob "$work/manifest.json")

name=${tag%:*}
ref=${tag##*:}
case $name in
*/*) full=$name ;;
*) full=docker.io/library/$name ;;
esac
cat >"$layout/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$(size "$manifest"),"annotations":{"org.opencontainers.image.ref.name":"$ref","io.containerd.image.name":"$full:$ref"}}]}
EOF
printf '{"imageLayoutVersion":"1.0.0"}\n' >"$layout/oci-layout"
cat >"$layout/manifest.json" <<EOF
[{"Config":"blobs/sha256/$config","RepoTags":["$tag"],"Layers":["blobs/sha256/$layer"]}]
EOF

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -C "$layout" -cf "$out.new" .
mv "$out.new" "$out"
echo "operator-image.sh: $out: $tag, layer sha256:$layer ($(size "$layer") bytes), manifest sha256:$manifest"
