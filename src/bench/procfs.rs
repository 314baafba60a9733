//! What the benches read from `/proc`: a process's CPU time and storage writes, the CPU
//! of every `postgres` process on the machine, and the load average.
//!
//! Linux only, as the benches are. CPU times are in clock ticks of 1/100 s (`USER_HZ`), so
//! a figure is only as fine as 10 ms over the whole run.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;

/// One process's line of `/proc/PID/stat`, the fields the benches use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProcStat<'a> {
    /// The command name (`comm`), without its parentheses.
    pub(super) command: &'a str,
    /// User + system time of the process itself.
    pub(super) own: Duration,
    /// User + system time of its children that have exited and been waited for.
    pub(super) reaped_children: Duration,
}

/// Parses a `/proc/PID/stat` line. The command name is in parentheses and may hold spaces
/// and parentheses itself, so the fields are counted from the last `)`.
pub(super) fn parse_stat(stat: &str) -> Option<ProcStat<'_>> {
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, command) = head.split_once('(')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (0), ppid (1), … utime (11), stime (12), cutime (13), cstime (14).
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let own = ticks(11)? + ticks(12)?;
    let reaped = ticks(13)? + ticks(14)?;
    Some(ProcStat { command, own: from_ticks(own), reaped_children: from_ticks(reaped) })
}

fn from_ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}

/// CPU time (user + system) process `pid` has used so far.
pub(super) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(parse_stat(&stat).context("unreadable /proc stat")?.own)
}

/// CPU time of every `postgres` process on the machine so far, per pid: its own time plus
/// that of its exited children (the postmaster's reaped backends). Summing a delta of this
/// over all pids counts a backend that ended during the run, since its time moved to the
/// postmaster's children's time, and a backend that started during it.
pub(super) fn postgres_cpu() -> anyhow::Result<BTreeMap<u32, Duration>> {
    let mut cpu = BTreeMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process may end between listing and reading: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if let Some(stat) = parse_stat(&stat).filter(|s| s.command == "postgres") {
            cpu.insert(pid, stat.own + stat.reaped_children);
        }
    }
    Ok(cpu)
}

/// The CPU `after` shows beyond `before`, summed over `pids` (all of `after`'s if `None`).
/// A process absent from `before` started during the run: all of its time counts.
pub(super) fn cpu_since(
    before: &BTreeMap<u32, Duration>,
    after: &BTreeMap<u32, Duration>,
    pids: Option<&[u32]>,
) -> Duration {
    after
        .iter()
        .filter(|(pid, _)| pids.is_none_or(|p| p.contains(pid)))
        .map(|(pid, now)| now.saturating_sub(before.get(pid).copied().unwrap_or_default()))
        .sum()
}

/// Bytes process `pid` has caused to be written to storage (`write_bytes` of
/// `/proc/PID/io`): for a server on SQLite, its WAL appends and checkpoints.
pub(super) fn storage_writes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in /proc/{pid}/io"))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub(super) fn load_average() -> anyhow::Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    Ok(text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_from_the_last_parenthesis() {
        let line = "2215 (postgres: bench) (x)) S 1 2215 2215 0 -1 4194560 9 0 0 0 120 30 7 3 20 0 1 0 77";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.command, "postgres: bench) (x)");
        assert_eq!(stat.own, Duration::from_millis(1500));
        assert_eq!(stat.reaped_children, Duration::from_millis(100));
    }

    #[test]
    fn a_truncated_stat_line_is_refused() {
        assert_eq!(parse_stat("12 (postgres) S 1 2 3"), None);
        assert_eq!(parse_stat("no parentheses at all"), None);
    }

    #[test]
    fn cpu_since_counts_new_processes_whole_and_old_ones_by_their_delta() {
        let ms = Duration::from_millis;
        let before = BTreeMap::from([(1, ms(100)), (2, ms(50))]);
        let after = BTreeMap::from([(1, ms(180)), (2, ms(50)), (3, ms(30))]);
        assert_eq!(cpu_since(&before, &after, None), ms(110));
        assert_eq!(cpu_since(&before, &after, Some(&[1, 4])), ms(80));
    }

    #[test]
    fn this_process_has_readable_cpu_and_storage_counters() {
        let pid = std::process::id();
        cpu_time(pid).unwrap();
        storage_writes(pid).unwrap();
        assert_eq!(load_average().unwrap().split(' ').count(), 3);
    }
}
