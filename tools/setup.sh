#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian machine for snapfs: system packages, then a
# virtualenv in .venv with snapfs and its Python dependencies. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# gdb, elfutils (eu-readelf), binutils (readelf) and python3-dbg (py-bt) for the core view's tests;
# postgresql (the distribution's server, with pgbench): the tree tests start their own cluster in
# a temporary directory (tests/support/postgres.py); the packaged default cluster is not created.
DEBS=(gcc libc6-dev make pkg-config fuse3 libfuse3-dev gdb elfutils binutils python3-dbg qemu-system-x86 qemu-utils python3-venv python3-dev psmisc libxxhash0 libdeflate0
      redis-server redis-tools strace postgresql)
missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install Debian packages (run as root or with sudo)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        # No cluster listening on the machine's port 5432 as a side effect of the install.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/snapfs.conf
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# FUSE needs the device; load the module where it is one.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Reinstall whenever anything the build reads changed (the project files, the C helpers'
# sources and headers, their cffi build scripts: the install compiles them into the
# package), or a compiled helper is missing. The stamp holds a digest of those files, so a
# rebase or a branch switch that changes them triggers it, whatever the files' times.
stamp=.venv/.snapfs-installed
build_digest() {
    find snapfs \( -name '*.c' -o -name '*.h' -o -name '*_build.py' \) -print | LC_ALL=C sort |
        xargs cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1
}
digest=$(build_digest)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] ||
   ! .venv/bin/python -c 'import snapfs.capture._native, snapfs.store._native' 2>/dev/null; then
    log=.venv/setup.log
    echo "setup: installing Python dependencies into .venv (log: $log)" >&2
    if ! { .venv/bin/pip install --disable-pip-version-check -U pip &&
           .venv/bin/pip install --disable-pip-version-check -e '.[test,bench]'; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "setup: pip install failed (full log: $log)" >&2
        exit 1
    fi
    echo "$digest" >"$stamp"
fi
# Byte-compile the package: an editable install is not compiled by pip, and where
# PYTHONDONTWRITEBYTECODE is set nothing ever writes the cache, so every `snapfs` run
# compiled its sources again (0.2 s of CPU before a capture starts). Stale entries are
# ignored by Python (it checks the source's time), so this is safe to run every time.
.venv/bin/python -m compileall -q snapfs >/dev/null
