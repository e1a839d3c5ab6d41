#!/usr/bin/env bash
# A real Kubernetes API server (with etcd) on loopback, for the operator's
# tests and for people trying the operator:
#
#   scripts/kube-apiserver.sh build              build/fetch what is missing; print the bin dir
#   scripts/kube-apiserver.sh start DIR [--rbac] start etcd + kube-apiserver; write DIR/kubeconfig
#   scripts/kube-apiserver.sh stop DIR           stop both
#
# kube-apiserver and kubectl are built from the k8s.io/kubernetes Go module
# pinned by tools/kube-apiserver/go.mod (its staging modules replaced by the
# matching v0.X.Y) and cached in $FERRY_KUBE_CACHE/<hash of go.mod+go.sum>/
# (default ~/.cache/ferry/kube): the first build takes minutes, later runs
# none. etcd is Debian trixie's etcd-server 3.5, fetched with apt-get
# download through a private sources list and state directory (the
# system's apt sources are not touched) and unpacked with dpkg-deb -x.
#
# start: a static token file (DIR/tokens.csv: an admin in system:masters,
# and the operator as the ServiceAccount ferry-system/ferry-operator),
# --authorization-mode=AlwaysAllow, or RBAC with --rbac; serving certs and
# service-account keys made with openssl. DIR/kubeconfig is the admin's,
# DIR/operator.kubeconfig the operator's; DIR/kubectl is kubectl. Returns
# once /readyz answers ok. Ports: KUBE_APISERVER_PORT (6443), ETCD_PORT
# (2379), ETCD_PEER_PORT (2380).
#
# Exit codes: 0 ok, 1 failure, 2 usage, 4 Go is missing (and nothing cached).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FERRY_KUBE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ferry/kube}
mod=$root/tools/kube-apiserver
kube_version=$(sed -nE 's#^(require)?[[:space:]]*k8s\.io/kubernetes (v[0-9.]+).*#\2#p' "$mod/go.mod" | head -1)
# What is built depends on go.mod, go.sum and the flags (the version stamp).
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  minor=${kube_version#v1.}; minor=${minor%%.*}
  ldflags="$ldflags -X $p.gitVersion=$kube_version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
hash=$( (cat "$mod/go.mod" "$mod/go.sum"; echo "$ldflags") | sha256sum | cut -c1-16)
bin=$cache/$hash
etcd_dir=$cache/etcd-3.5
apiserver_port=${KUBE_APISERVER_PORT:-6443}
etcd_port=${ETCD_PORT:-2379}
etcd_peer_port=${ETCD_PEER_PORT:-2380}

say() { echo "kube-apiserver.sh: $*" >&2; }

find_go() {
  if [ -n "${GO:-}" ]; then { [ -x "$GO" ] || command -v "$GO" >/dev/null 2>&1; } && echo "$GO"; return 0; fi
  command -v go 2>/dev/null || { [ -x /usr/local/go/bin/go ] && echo /usr/local/go/bin/go; } || true
}

build_kube() {
  [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kubectl" ] && return 0
  local go
  go=$(find_go)
  if [ -z "$go" ]; then
    say "Go is missing (no 'go' in PATH, no /usr/local/go/bin/go): cannot build kube-apiserver"
    exit 4
  fi
  mkdir -p "$bin"
  say "building kube-apiserver and kubectl $kube_version into $bin (the first build takes minutes)"
  local t
  for t in kube-apiserver kubectl; do
    [ -x "$bin/$t" ] && continue
    (cd "$mod" && GOCACHE=${FERRY_KUBE_GOCACHE:-$cache/gocache} GOFLAGS=${GOFLAGS:--p=1} \
      "$go" build -trimpath -ldflags="$ldflags" -o "$bin/$t.tmp" "k8s.io/kubernetes/cmd/$t")
    mv "$bin/$t.tmp" "$bin/$t"
  done
}

fetch_etcd() {
  [ -x "$etcd_dir/usr/bin/etcd" ] && return 0
  local apt=$cache/apt
  mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/state/lists/partial" \
    "$apt/cache/archives/partial" "$apt/debs"
  # The mirror the system's own sources name, with trixie instead.
  local mirror
  mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | head -1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} trixie main" > "$apt/etc/sources.list"
  local o=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$apt/etc/preferences" -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
    -o "Dir::State=$apt/state" -o "Dir::State::status=/var/lib/dpkg/status" -o "Dir::Cache=$apt/cache"
    -o "APT::Sandbox::User=root")
  say "fetching etcd-server (trixie) through a private apt sources list in $apt"
  apt-get "${o[@]}" -qq update
  (cd "$apt/debs" && rm -f etcd-server_*.deb && apt-get "${o[@]}" -qq download etcd-server)
  rm -rf "$etcd_dir.tmp"
  dpkg-deb -x "$apt"/debs/etcd-server_*.deb "$etcd_dir.tmp"
  # Read whole, then matched: `etcd --version | grep -q` under pipefail
  # fails whenever grep's early exit kills etcd with SIGPIPE.
  local version
  version=$("$etcd_dir.tmp/usr/bin/etcd" --version) || { say "etcd-server from trixie does not run here"; exit 1; }
  [[ $version =~ (^|$'\n')'etcd Version: 3.5.' ]] \
    || { say "etcd-server is not 3.5: ${version%%$'\n'*}"; exit 1; }
  rm -rf "$etcd_dir" && mv "$etcd_dir.tmp" "$etcd_dir"
}

# Builds and fetches what is missing, one caller at a time.
prepare() {
  mkdir -p "$cache"
  (
    flock 9
    build_kube
    fetch_etcd
  ) 9>"$cache/.lock"
}

stop_pid() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

kubeconfig() { # FILE TOKEN USER
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferry-test
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $(base64 -w0 < "$dir/pki/ca.crt")
users:
- name: $3
  user:
    token: $2
contexts:
- name: ferry-test
  context:
    cluster: ferry-test
    user: $3
    namespace: default
current-context: ferry-test
EOF
}

start() {
  local rbac=AlwaysAllow
  [ "${1:-}" = --rbac ] && rbac=RBAC
  prepare
  mkdir -p "$dir/pki"
  dir=$(cd "$dir" && pwd)
  stop_all
  local pki=$dir/pki
  if [ ! -f "$pki/apiserver.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 \
      -subj /CN=ferry-test-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" \
      -subj /CN=kube-apiserver 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$pki/ext"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -out "$pki/apiserver.crt" -days 3650 -extfile "$pki/ext" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    local admin operator
    admin=$(openssl rand -hex 16)
    operator=$(openssl rand -hex 16)
    printf '%s,admin,admin,system:masters\n%s,system:serviceaccount:ferry-system:ferry-operator,ferry-operator,"system:serviceaccounts,system:serviceaccounts:ferry-system"\n' \
      "$admin" "$operator" > "$dir/tokens.csv"
    chmod 600 "$dir/tokens.csv"
    kubeconfig "$dir/kubeconfig" "$admin" admin
    kubeconfig "$dir/operator.kubeconfig" "$operator" ferry-operator
  fi
  ln -sf "$bin/kubectl" "$dir/kubectl"
  local admin_token
  admin_token=$(head -1 "$dir/tokens.csv" | cut -d, -f1)

  "$etcd_dir/usr/bin/etcd" --name ferry-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "ferry-test=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync \
    > "$dir/etcd.log" 2>&1 < /dev/null &
  echo $! > "$dir/etcd.pid"

  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --token-auth-file "$dir/tokens.csv" \
    --authorization-mode "$rbac" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 \
    --endpoint-reconciler-type none \
    --enable-priority-and-fairness=false --profiling=false \
    --cert-dir "$dir/certs" \
    > "$dir/kube-apiserver.log" 2>&1 < /dev/null &
  echo $! > "$dir/kube-apiserver.pid"

  local i
  for i in $(seq 240); do
    if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
      say "kube-apiserver exited; the end of $dir/kube-apiserver.log:"; tail -20 "$dir/kube-apiserver.log" >&2
      stop_all; exit 1
    fi
    if [ "$(curl -s --max-time 2 --cacert "$pki/ca.crt" -H "Authorization: Bearer $admin_token" \
        "https://127.0.0.1:$apiserver_port/readyz" 2>/dev/null)" = ok ]; then
      echo "$rbac" > "$dir/mode"
      say "ready on https://127.0.0.1:$apiserver_port ($rbac); KUBECONFIG=$dir/kubeconfig $dir/kubectl ..."
      return 0
    fi
    sleep 0.5
  done
  say "kube-apiserver not ready within 120 s; see $dir/kube-apiserver.log"
  stop_all; exit 1
}

stop_all() {
  stop_pid "$dir/kube-apiserver.pid"
  stop_pid "$dir/etcd.pid"
}

case "${1:-}" in
  build)
    prepare
    echo "$bin"
    ;;
  start)
    [ $# -ge 2 ] || { say "usage: $0 start DIR [--rbac]"; exit 2; }
    dir=$2
    start "${3:-}"
    ;;
  stop)
    [ $# -ge 2 ] || { say "usage: $0 stop DIR"; exit 2; }
    dir=$2
    stop_all
    ;;
  *)
    say "usage: $0 build | start DIR [--rbac] | stop DIR"
    exit 2
    ;;
esac
