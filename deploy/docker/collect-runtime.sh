#!/usr/bin/env bash
# Used by the build stage of Dockerfile.store / Dockerfile.worker: finds what the given binaries
# need at run time, so the runtime stage installs exactly that and nothing else.
#   collect-runtime.sh OUTDIR BINARY... [--dlopen LIST]
# LIST: a file of sonames the binaries open at run time (dlopen; ldd does not show them, e.g.
#   the build's worker/kvq-worker.dlopen: BLAS, cuBLAS), one per line; each is found (ldconfig's
#   cache, then the CUDA toolkit's library folders) and taken with what it loads, like a binary's.
# Writes OUTDIR/packages.txt: the Debian packages that own each shared library the binaries load
#   (found with ldd + dpkg -S), one per line, sorted;
# Copies into OUTDIR/lib/ every library under /usr/local (the CUDA toolkit's libraries, e.g. cuBLAS:
#   NVIDIA's packages are not in Debian's archive, so the runtime stage could not install them) and
#   every library no Debian package owns, under the soname the binary asks for.
# Fails when a library cannot be resolved (ldd "not found"): an image that would not start.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUTDIR BINARY... [--dlopen LIST]" >&2
  exit 2
fi
out=$1
shift
bins=()
dlopen_list=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dlopen) dlopen_list=${2:?--dlopen needs a file}; shift 2 ;;
    *) bins+=("$1"); shift ;;
  esac
done
mkdir -p "$out/lib"
pkgs=$(mktemp)
trap 'rm -f "$pkgs"' EXIT

resolve_soname() {  # prints the path of a library by soname, or nothing
  local name=$1 d
  ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n && /x86-64|x86_64|aarch64/ {print $NF; exit}' | grep . && return 0
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/cuda-*/lib64; do
    [ -e "$d/$name" ] && { echo "$d/$name"; return 0; }
  done
  return 0
}

owner() {  # prints the owning Debian package of a path, or nothing
  local p=$1 alt
  dpkg -S "$p" 2>/dev/null | head -n1 | cut -d: -f1 && return 0
  # merged /usr: ldd may print /lib/... while dpkg registered /usr/lib/... (or the reverse)
  case "$p" in
    /usr/lib/*) alt=${p#/usr} ;;
    /lib/*) alt=/usr$p ;;
    *) return 0 ;;
  esac
  dpkg -S "$alt" 2>/dev/null | head -n1 | cut -d: -f1 || true
}

# a dlopen'ed library counts as one more "binary" (its own file and what it loads), under its soname
dl_entries=()
if [ -n "$dlopen_list" ]; then
  while read -r name; do
    [ -n "$name" ] || continue
    path=$(resolve_soname "$name")
    [ -n "$path" ] || { echo "collect-runtime: $name (opened at run time) not found on this machine" >&2; exit 1; }
    echo "collect-runtime: $name is opened at run time: $path" >&2
    bins+=("$path")
    dl_entries+=("$name $path")
  done <"$dlopen_list"
fi

for bin in "${bins[@]}"; do
  [ -e "$bin" ] || { echo "collect-runtime: $bin does not exist" >&2; exit 1; }
  if ldd "$bin" | grep -q 'not found'; then
    echo "collect-runtime: unresolved libraries for $bin:" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 1
  fi
  # lines look like: "libfoo.so.1 => /usr/lib/x86_64-linux-gnu/libfoo.so.1 (0x...)"
  { ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
    for e in "${dl_entries[@]}"; do if [ "${e#* }" = "$bin" ]; then echo "$e"; fi; done
  } | while read -r soname path; do
    pkg=""
    case "$(readlink -f "$path")" in
      /usr/local/*) ;;  # bundled below
      *) pkg=$(owner "$path") ;;
    esac
    if [ -z "$pkg" ] && [ "${path#/usr/local/}" = "$path" ]; then
      pkg=$(owner "$(readlink -f "$path")")
    fi
    if [ -n "$pkg" ]; then
      echo "$pkg" >>"$pkgs"
    else
      cp -L "$path" "$out/lib/$soname"
      echo "collect-runtime: bundling $soname (from $path)" >&2
    fi
  done
done
sort -u "$pkgs" >"$out/packages.txt"
echo "collect-runtime: $(wc -l <"$out/packages.txt") Debian packages, $(ls "$out/lib" | wc -l) bundled libraries" >&2
