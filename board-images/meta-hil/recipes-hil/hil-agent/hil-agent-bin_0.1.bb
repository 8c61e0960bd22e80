SUMMARY = "HIL fault-injection agent for the KV260 robustness lab (prebuilt static binary)"
DESCRIPTION = "The same agent as hil-agent, installed from a statically linked aarch64 \
binary built outside Yocto (tools/release.sh agent). For PetaLinux/Yocto releases whose \
Rust is older than the workspace needs."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# UNTESTED: no Yocto build could be run where this was written.
# Put these next to this recipe in files/ (copy from the repository and the release build):
#   hil-agent            target/aarch64-unknown-linux-musl/release/hil-agent
#   hil-agent.service    deploy/hil-agent.service
#   board.yaml           board-images/boards/kv260.yaml
#   agent.yaml           deploy/agent.example.yaml, edited for this board
SRC_URI = "file://hil-agent file://hil-agent.service file://board.yaml file://agent.yaml"
S = "${WORKDIR}"

inherit systemd

COMPATIBLE_HOST = "aarch64.*-linux"
RPROVIDES:${PN} += "hil-agent"
RCONFLICTS:${PN} += "hil-agent"

SYSTEMD_SERVICE:${PN} = "hil-agent.service"
SYSTEMD_AUTO_ENABLE = "enable"

do_install() {
    install -D -m 0755 ${S}/hil-agent ${D}${bindir}/hil-agent
    install -d ${D}${systemd_system_unitdir}
    sed -e 's#/usr/local/bin/hil-agent#${bindir}/hil-agent#g' \
        ${S}/hil-agent.service > ${D}${systemd_system_unitdir}/hil-agent.service
    chmod 0644 ${D}${systemd_system_unitdir}/hil-agent.service
    install -d -m 0750 ${D}${sysconfdir}/hil
    install -m 0644 ${S}/board.yaml ${D}${sysconfdir}/hil/board.yaml
    install -m 0640 ${S}/agent.yaml ${D}${sysconfdir}/hil/agent.yaml
}

# A static musl binary: nothing to strip-split usefully, no shared-library deps.
INSANE_SKIP:${PN} += "already-stripped ldflags"
CONFFILES:${PN} = "${sysconfdir}/hil/agent.yaml ${sysconfdir}/hil/board.yaml"
RRECOMMENDS:${PN} += "kernel-module-i2c-dev"
