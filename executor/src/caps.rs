//! Capabilities: Docker's default set, nothing more.

use crate::fail::{Fail, Step};
use crate::sys;

/// Docker's default capabilities (moby `oci/caps/defaults.go`), as bit numbers.
pub const DOCKER_DEFAULT_CAPS: [(u32, &str); 14] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (10, "CAP_NET_BIND_SERVICE"),
    (13, "CAP_NET_RAW"),
    (18, "CAP_SYS_CHROOT"),
    (27, "CAP_MKNOD"),
    (29, "CAP_AUDIT_WRITE"),
    (31, "CAP_SETFCAP"),
];

/// [`DOCKER_DEFAULT_CAPS`] as a bit mask, as `/proc/<pid>/status` shows it.
pub fn docker_default_mask() -> u64 {
    DOCKER_DEFAULT_CAPS
        .iter()
        .fold(0, |m, (bit, _)| m | (1u64 << bit))
}

/// Drops every capability outside the default set from the bounding set and clears
/// the ambient set. Needs CAP_SETPCAP, so it runs before the user switch.
pub(crate) fn drop_bounding() -> Result<(), Fail> {
    let keep = docker_default_mask();
    for cap in 0..64u32 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        match sys::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
            Ok(_) => {}
            // Past the kernel's last capability.
            Err(nix::errno::Errno::EINVAL) => break,
            Err(errno) => {
                return Err(Fail::step(
                    format!("drop capability {cap} from the bounding set"),
                    errno as i32,
                ));
            }
        }
    }
    sys::clear_ambient().step(|| "clear the ambient capabilities".to_owned())
}

/// Sets effective = permitted = the default set, inheritable empty (as Docker since
/// CVE-2022-24769), for a payload running as uid 0. A non-root payload keeps the
/// empty sets the kernel leaves after `setresuid` (Docker's behaviour too).
pub(crate) fn set_root_caps() -> Result<(), Fail> {
    let mask = docker_default_mask();
    sys::capset(mask, mask, 0).step(|| "set the capabilities".to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_mask_matches_docker() {
        // `docker run --rm busybox grep Cap /proc/self/status` prints CapBnd 00000000a80425fb.
        assert_eq!(super::docker_default_mask(), 0x0000_0000_a804_25fb);
    }
}
