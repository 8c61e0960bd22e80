SUMMARY = "HIL fault-injection agent for the KV260 robustness lab"
DESCRIPTION = "hil-agent drives the PL accelerator through /dev/mem, sets supply voltages \
over raw I2C, injects bit flips, measures power and temperature, and streams one record \
per inference to hil-controller over a websocket."
HOMEPAGE = "https://github.com/EXAMPLE/kv260-hil"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# UNTESTED: no Yocto build could be run where this was written. Replace the URL and
# SRCREV with your repository and a commit.
SRC_URI = "git://github.com/EXAMPLE/kv260-hil.git;protocol=https;branch=main"
SRCREV = "0000000000000000000000000000000000000000"
S = "${WORKDIR}/git"

# Rust >= 1.89 is needed (the workspace uses edition 2024 and rust-version 1.89): the
# rust recipe of oe-core's release (check: bitbake -e rust | grep ^PV=) or meta-rust-bin.
# Older releases (PetaLinux 2024/2025 = scarthgap ships an older Rust): use
# hil-agent-bin_0.1.bb with a binary built by `tools/release.sh agent` instead.
inherit cargo cargo-update-recipe-crates systemd

# crate:// SRC_URI entries and checksums for every crate in Cargo.lock. Generate with
#   bitbake -c update_crates hil-agent
# or, without bitbake: board-images/meta-hil/scripts/gen-crates-inc.py Cargo.lock > hil-agent-crates.inc
include ${BPN}-crates.inc

# Build only the agent package of the workspace; the lock file is at the workspace root.
CARGO_SRC_DIR = "crates/agent"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

SYSTEMD_SERVICE:${PN} = "hil-agent.service"
SYSTEMD_AUTO_ENABLE = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    sed -e 's#/usr/local/bin/hil-agent#${bindir}/hil-agent#g' \
        ${S}/deploy/hil-agent.service > ${D}${systemd_system_unitdir}/hil-agent.service
    chmod 0644 ${D}${systemd_system_unitdir}/hil-agent.service
    install -d -m 0750 ${D}${sysconfdir}/hil
    install -m 0644 ${S}/board-images/boards/kv260.yaml ${D}${sysconfdir}/hil/board.yaml
    install -m 0640 ${S}/deploy/agent.example.yaml ${D}${sysconfdir}/hil/agent.yaml
    install -d ${D}${datadir}/hil/models
    cp --no-preserve=ownership ${S}/board-images/models/*.json ${S}/board-images/models/*.safetensors \
        ${D}${datadir}/hil/models/ 2>/dev/null || true
}

FILES:${PN} += "${datadir}/hil"
CONFFILES:${PN} = "${sysconfdir}/hil/agent.yaml ${sysconfdir}/hil/board.yaml"
# The agent talks to /dev/i2c-1 through i2c-dev; add to the image (or machine) config:
#   KERNEL_MODULE_AUTOLOAD += "i2c-dev"
RRECOMMENDS:${PN} += "kernel-module-i2c-dev"
