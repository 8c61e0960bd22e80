#!/usr/bin/env bash
# Release builds.
#   tools/release.sh agent        static aarch64 hil-agent (musl, Debian cross gcc) for any KV260 image
#   tools/release.sh agent-zig    the same, linked with zig (cargo-zigbuild from PyPI)
#   tools/release.sh agent-gnu    dynamically linked aarch64 hil-agent (glibc >= 2.34, Debian cross gcc)
#   tools/release.sh controller   x86_64 hil-controller + hilctl for the lab host
# Output paths are printed at the end. See docs/release.md.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
die() { echo "release: error: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

add_target() {
  rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
  # The rustup server may be unreachable from build machines: say so loudly.
  rustup target add "$1" || die "rustup target add $1 failed (is static.rust-lang.org reachable?); the aarch64 standard library comes only from rustup"
}

case "$what" in
  agent)
    # Static musl binary with Debian's cross gcc as linker and C compiler: the agent is
    # pure Rust apart from ring's C/asm. Exactly what CI builds (tools/aarch64-check.sh).
    add_target aarch64-unknown-linux-musl
    command -v aarch64-linux-gnu-gcc >/dev/null || as_root apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -p agent --bin hil-agent --target aarch64-unknown-linux-musl
    out=target/aarch64-unknown-linux-musl/release/hil-agent
    ;;
  agent-zig)
    # The same static musl binary linked by zig (cargo-zigbuild from PyPI), for when C
    # dependencies need a real musl toolchain.
    add_target aarch64-unknown-linux-musl
    if ! command -v cargo-zigbuild >/dev/null; then
      venv=target/zigbuild-venv
      [ -x "$venv/bin/cargo-zigbuild" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q cargo-zigbuild==0.24.1; }
      export PATH="$PWD/$venv/bin:$PATH"
    fi
    cargo zigbuild --release --locked -p agent --bin hil-agent --target aarch64-unknown-linux-musl
    out=target/aarch64-unknown-linux-musl/release/hil-agent
    ;;
  agent-gnu)
    add_target aarch64-unknown-linux-gnu
    command -v aarch64-linux-gnu-gcc >/dev/null || as_root apt-get install -y -qq gcc-aarch64-linux-gnu
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
      cargo build --release --locked -p agent --bin hil-agent --target aarch64-unknown-linux-gnu
    out=target/aarch64-unknown-linux-gnu/release/hil-agent
    ;;
  controller)
    cargo build --release --locked -p controller --bin hil-controller --bin hilctl
    out="target/release/hil-controller target/release/hilctl"
    ;;
  *) die "usage: tools/release.sh agent|agent-zig|agent-gnu|controller" ;;
esac

for f in $out; do
  [ -x "$f" ] || die "$f was not produced"
  echo "release: built $f ($(du -h "$f" | cut -f1))"
  command -v file >/dev/null && file -b "$f" | sed 's/^/release:   /'
done
if [ "$what" != controller ] && command -v qemu-aarch64 >/dev/null; then
  qemu-aarch64 -L /usr/aarch64-linux-gnu "${out%% *}" --version | sed 's/^/release: qemu-aarch64: /'
fi
