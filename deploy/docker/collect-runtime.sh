#!/usr/bin/env bash
# Used by the build stage of Dockerfile.store / Dockerfile.worker: finds what the given binaries
# need at run time, so the runtime stage installs exactly that and nothing else.
#   collect-runtime.sh OUTDIR BINARY...
# Writes OUTDIR/packages.txt: the Debian packages that own each shared library the binaries load
#   (found with ldd + dpkg -S), one per line, sorted;
# Copies into OUTDIR/lib/ every library under /usr/local (the CUDA toolkit's libraries, e.g. cuBLAS:
#   NVIDIA's packages are not in Debian's archive, so the runtime stage could not install them) and
#   every library no Debian package owns, under the soname the binary asks for.
# Fails when a library cannot be resolved (ldd "not found"): an image that would not start.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUTDIR BINARY..." >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out/lib"
pkgs=$(mktemp)
trap 'rm -f "$pkgs"' EXIT

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

for bin in "$@"; do
  [ -x "$bin" ] || { echo "collect-runtime: $bin is not an executable" >&2; exit 1; }
  if ldd "$bin" | grep -q 'not found'; then
    echo "collect-runtime: unresolved libraries for $bin:" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 1
  fi
  # lines look like: "libfoo.so.1 => /usr/lib/x86_64-linux-gnu/libfoo.so.1 (0x...)"
  ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
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
