#!/usr/bin/env bash
# Install hil-agent on a KV260 running Ubuntu 22.04/24.04 for Kria. Run on the board, as root,
# from a checkout of this repository (or a copy of deploy/ and board-images/).
#
#   sudo board-images/install-ubuntu.sh --binary hil-agent --board-id kv260-01 \
#        --controller wss://hil-controller.lab.example:8080/v1/agent --token-file kv260-01.token \
#        [--firmware DIR] [--models DIR] [--force] [--root DIR]
#
#   --binary      statically linked aarch64 hil-agent (tools/release.sh agent; docs/release.md)
#   --token-file  file whose first line is this board's token (controller.yaml tokens.boards);
#                 `-` reads it from stdin. Never pass tokens on the command line.
#   --firmware    folder with hil-unet.bit.bin, hil-unet.dtbo, shell.json (board-images/firmware/README.md)
#   --models      model files to install (default: board-images/models of this checkout)
#   --force       overwrite an existing /etc/hil/agent.yaml and board.yaml
#   --root DIR    install into DIR instead of / and skip systemctl, modprobe and xmutil
#                 (for staging an image; tools/check-deploy.sh tests the script this way)
#
# UNTESTED on a real KV260 (none was available); tested with --root on x86_64 Debian.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
die() { echo "install-ubuntu: error: $*" >&2; exit 1; }
say() { echo "install-ubuntu: $*"; }

binary= board_id= controller= token_file= firmware= models="$repo/board-images/models" force=0 root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --board-id) board_id=${2:?--board-id needs a value}; shift 2 ;;
    --controller) controller=${2:?--controller needs a ws:// or wss:// URL}; shift 2 ;;
    --token-file) token_file=${2:?--token-file needs a path or -}; shift 2 ;;
    --firmware) firmware=${2:?--firmware needs a folder}; shift 2 ;;
    --models) models=${2:?--models needs a folder}; shift 2 ;;
    --force) force=1; shift ;;
    --root) root=${2:?--root needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$binary" ] || die "--binary is required"
[ -n "$board_id" ] || die "--board-id is required"
[ -n "$controller" ] || die "--controller is required"
[ -n "$token_file" ] || die "--token-file is required"
[[ "$board_id" =~ ^[A-Za-z0-9._-]{1,128}$ ]] || die "--board-id '$board_id': use 1-128 of A-Z a-z 0-9 . _ -"
[[ "$controller" =~ ^wss?://[^[:space:]]+$ ]] || die "--controller '$controller' must be a ws:// or wss:// URL"
[[ "$controller" == ws://* ]] && say "warning: ws:// sends the board token in clear; use wss:// outside a closed lab network"

live=0
if [ "$root" = / ]; then
  live=1
  [ "$(id -u)" = 0 ] || die "run as root (sudo), or use --root DIR to stage"
  [ "$(uname -m)" = aarch64 ] || die "this is $(uname -m), not a KV260 (aarch64); use --root DIR to stage elsewhere"
  grep -q '^ID=ubuntu' /etc/os-release 2>/dev/null || say "warning: not Ubuntu; continuing, but only Ubuntu for Kria was considered"
  command -v xmutil >/dev/null || say "warning: xmutil not found: is this Ubuntu for Kria (xlnx-* packages)?"
else
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
fi

# --- inputs --------------------------------------------------------------------------
[ -f "$binary" ] || die "--binary $binary: no such file"
# ELF, 64-bit, little-endian, e_machine 183 (EM_AARCH64) at offset 18.
magic=$(od -An -tx1 -N4 "$binary" | tr -d ' \n')
class=$(od -An -tu1 -j4 -N1 "$binary" | tr -d ' ')
machine=$(od -An -tu2 -j18 -N2 --endian=little "$binary" | tr -d ' ')
[ "$magic" = 7f454c46 ] && [ "$class" = 2 ] && [ "$machine" = 183 ] \
  || die "--binary $binary is not a 64-bit aarch64 ELF executable (build it with tools/release.sh agent)"
for f in deploy/hil-agent.service deploy/agent.example.yaml board-images/boards/kv260.yaml; do
  [ -f "$repo/$f" ] || die "$repo/$f missing: run this script from a full checkout"
done
if [ "$token_file" = - ]; then token=$(head -n1); else
  [ -r "$token_file" ] || die "--token-file $token_file: cannot read"
  token=$(head -n1 "$token_file")
fi
token=$(printf '%s' "$token" | tr -d '[:space:]')
[ ${#token} -ge 16 ] || die "the token is shorter than 16 characters: generate one with openssl rand -hex 24"
if [ -n "$firmware" ]; then
  for f in hil-unet.bit.bin hil-unet.dtbo shell.json; do
    [ -f "$firmware/$f" ] || die "--firmware $firmware: $f missing (board-images/firmware/README.md says how to build it)"
  done
fi

# --- files ---------------------------------------------------------------------------
etc="$root/etc/hil"
install -d -m 0750 "$etc"
install -D -m 0755 "$binary" "$root/usr/local/bin/hil-agent"
say "installed $root/usr/local/bin/hil-agent"

if [ -e "$etc/board.yaml" ] && [ $force = 0 ]; then
  say "kept existing $etc/board.yaml (--force replaces it)"
else
  install -m 0644 "$repo/board-images/boards/kv260.yaml" "$etc/board.yaml"
  say "installed $etc/board.yaml (check the UNVERIFIED rail entries against your board: docs/operating.md)"
fi

if [ -e "$etc/agent.yaml" ] && [ $force = 0 ]; then
  say "kept existing $etc/agent.yaml (--force replaces it)"
else
  sed -e "s#^controller_url:.*#controller_url: $controller#" \
      -e "s#^board_id:[^\#]*#board_id: $board_id                      #" \
      "$repo/deploy/agent.example.yaml" > "$etc/agent.yaml.new"
  grep -q "^controller_url: $controller\$" "$etc/agent.yaml.new" && grep -q "^board_id: $board_id " "$etc/agent.yaml.new" \
    || die "could not fill in deploy/agent.example.yaml (its controller_url/board_id lines changed?)"
  chmod 0640 "$etc/agent.yaml.new" && mv "$etc/agent.yaml.new" "$etc/agent.yaml"
  say "wrote $etc/agent.yaml for board $board_id"
fi

(umask 077; printf '%s\n' "$token" > "$etc/agent.token.new") && mv "$etc/agent.token.new" "$etc/agent.token"
chmod 0600 "$etc/agent.token"
say "wrote $etc/agent.token (0600)"

install -d "$root/usr/share/hil/models"
n=0
for f in "$models"/*.json "$models"/*.safetensors; do
  [ -f "$f" ] || continue
  install -m 0644 "$f" "$root/usr/share/hil/models/"; n=$((n + 1))
done
[ $n -gt 0 ] || say "warning: no model files in $models; the agent will offer no models"
say "installed $n model files into $root/usr/share/hil/models"

install -d -m 0700 "$root/var/lib/hil-agent"
install -D -m 0644 /dev/stdin "$root/etc/modules-load.d/hil-agent.conf" <<<"i2c-dev"
install -D -m 0644 "$repo/deploy/hil-agent.service" "$root/etc/systemd/system/hil-agent.service"
say "installed $root/etc/systemd/system/hil-agent.service"

if [ -n "$firmware" ]; then
  fw="$root/lib/firmware/xilinx/hil-unet"
  install -d "$fw"
  install -m 0644 "$firmware/hil-unet.bit.bin" "$firmware/hil-unet.dtbo" "$firmware/shell.json" "$fw/"
  say "installed the accelerator app into $fw"
fi

if [ $live = 0 ]; then
  say "staged into $root (no services touched)"
  exit 0
fi

# --- activate --------------------------------------------------------------------------
modprobe i2c-dev
if [ -n "$firmware" ] || [ -d /lib/firmware/xilinx/hil-unet ]; then
  xmutil unloadapp || true
  xmutil loadapp hil-unet || die "xmutil loadapp hil-unet failed: see journalctl -u dfx-mgr"
fi
/usr/local/bin/hil-agent --version
systemctl daemon-reload
systemctl enable --now hil-agent.service
say "hil-agent is running: journalctl -u hil-agent -f; on the controller: hilctl boards"
