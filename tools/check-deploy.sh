#!/usr/bin/env bash
# Static checks of what we ship for deployment (called by tools/test.sh; also runnable alone):
#   Prometheus config + alert rules (promtool check), alert unit tests (promtool test rules),
#   dashboard structure (tools/check_dashboards.py), every panel query parsed as PromQL
#   (promtool check rules on a generated recording-rule file), systemd units
#   (systemd-analyze verify, warnings count as failures).
# Any failure exits non-zero with the tool's own message.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-deploy: FAILED: $*" >&2; exit 1; }
step() { echo "check-deploy: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

command -v promtool >/dev/null || fail "promtool missing (apt-get install prometheus)"

for cfg in deploy/prometheus/prometheus*.yml; do
  step "promtool check config $cfg"
  promtool check config "$cfg" || fail "$cfg"
done

step "promtool check rules deploy/prometheus/rules/*.yml"
promtool check rules deploy/prometheus/rules/*.yml || fail "alert rules"

step "promtool test rules deploy/prometheus/tests/*.yml"
promtool test rules deploy/prometheus/tests/*.yml || fail "alert rule unit tests"

step "dashboard structure (tools/check_dashboards.py)"
python3 tools/check_dashboards.py || fail "dashboard structure"

step "every dashboard query parses as PromQL"
python3 tools/check_dashboards.py --as-rules > "$tmp/dashboard-queries.yml" || fail "extracting dashboard queries"
promtool check rules "$tmp/dashboard-queries.yml" || fail "a dashboard query is not valid PromQL"

if command -v dtc >/dev/null && command -v fdtoverlay >/dev/null; then
  step "device-tree overlays compile and apply (board-images/firmware)"
  fw=board-images/firmware
  dtc -q -@ -I dts -O dtb -o "$tmp/base.dtb" "$fw/stand-in-base.dts" || fail "stand-in base tree"
  # Warnings are errors here, except one dtc gives for every root-node overlay fragment.
  for src in "$fw"/hil-unet/hil-unet.dtso "$fw"/hil-reserved-memory.dtso; do
    out=$(dtc -W no-avoid_unnecessary_addr_size -@ -I dts -O dtb -o "$tmp/$(basename "$src" .dtso).dtbo" "$src" 2>&1) \
      || fail "$src: $out"
    [ -z "$out" ] || fail "$src: $out"
  done
  fdtoverlay -i "$tmp/base.dtb" -o "$tmp/merged.dtb" "$tmp/hil-reserved-memory.dtbo" "$tmp/hil-unet.dtbo" \
    || fail "overlays do not apply to the stand-in base tree"
  for node in /reserved-memory/hil-dma@60000000 /axi/hil-unet@a0000000; do
    fdtget -l "$tmp/merged.dtb" "$node" >/dev/null 2>&1 || fail "merged tree lacks $node"
  done
  [ "$(fdtget "$tmp/merged.dtb" /firmware/zynqmp-firmware/pcap firmware-name)" = hil-unet.bit.bin ] \
    || fail "overlay does not set fpga_full firmware-name to hil-unet.bit.bin"
elif [ "${HIL_CI:-0}" = 1 ]; then
  fail "dtc/fdtoverlay missing (apt-get install device-tree-compiler)"
else
  echo "check-deploy: WARNING: device-tree-compiler not installed, overlays not checked" >&2
fi

step "board-images/install-ubuntu.sh stages a board root (--root), refuses a non-aarch64 binary"
# A 64-byte ELF header saying EM_AARCH64 stands in for the release binary.
python3 -c 'import struct,sys; sys.stdout.buffer.write(b"\x7fELF"+bytes([2,1,1,0])+bytes(8)+struct.pack("<HHI",2,183,1)+bytes(40))' > "$tmp/hil-agent"
printf '%s\n' 0123456789abcdef0123456789abcdef > "$tmp/token"
board-images/install-ubuntu.sh --binary "$tmp/hil-agent" --board-id kv260-07 \
  --controller wss://controller.test:8080/v1/agent --token-file "$tmp/token" --root "$tmp/root" >/dev/null \
  || fail "install-ubuntu.sh --root"
for f in usr/local/bin/hil-agent etc/hil/board.yaml etc/hil/agent.yaml etc/hil/agent.token \
         etc/systemd/system/hil-agent.service etc/modules-load.d/hil-agent.conf; do
  [ -f "$tmp/root/$f" ] || fail "install-ubuntu.sh did not install /$f"
done
grep -q '^board_id: kv260-07 ' "$tmp/root/etc/hil/agent.yaml" || fail "agent.yaml lacks the board id"
[ "$(stat -c %a "$tmp/root/etc/hil/agent.token")" = 600 ] || fail "agent.token is not mode 0600"
if board-images/install-ubuntu.sh --binary /bin/sh --board-id b --controller ws://x/v1/agent \
     --token-file "$tmp/token" --root "$tmp/root2" >/dev/null 2>&1; then
  fail "install-ubuntu.sh accepted a non-aarch64 binary"
fi

if command -v systemd-analyze >/dev/null; then
  for unit in deploy/*.service; do
    step "systemd-analyze verify $unit"
    # verify also checks that ExecStart exists; the binaries are not installed on a build
    # machine, so point ExecStart at an existing executable. Everything else is checked as shipped.
    sed -E 's#^(ExecStart(Pre|Post)?=[-+!@:]*)/usr/(local/)?bin/hil-[a-z-]+#\1/bin/true#; s#^(ExecStart(Pre|Post)?=[-+!@:]*)/usr/bin/xmutil#\1/bin/true#' \
      "$unit" > "$tmp/$(basename "$unit")"
    out=$(systemd-analyze verify "$tmp/$(basename "$unit")" 2>&1) || fail "$unit: $out"
    # Unknown keys and bad values are only warnings with exit status 0: treat them as errors.
    [ -z "$out" ] || fail "$unit: $out"
    systemd-analyze security --offline=yes "$tmp/$(basename "$unit")" 2>/dev/null | tail -1 || true
  done
elif [ "${HIL_CI:-0}" = 1 ]; then
  fail "systemd-analyze missing (apt-get install systemd)"
else
  echo "check-deploy: WARNING: systemd-analyze not installed, units not verified" >&2
fi

step "all deployment checks passed"
