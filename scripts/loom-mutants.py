#!/usr/bin/env python3
"""`make loom-mutants`: proves each loom model can fail.

For every model, put one deliberate bug into the real code of src/, run that model, and require
it to FAIL; then restore the file. A model that passes with its bug in place proves nothing.
Run from the repository root; restores every file even when interrupted.
"""
import os, subprocess, sys

MUTANTS = [
    ("registry", "src/slots.rs",
     "check-then-insert: look under one lock, insert under another",
     """            let mut map = crate::sync::lock(&self.map);
            map.entry(key).or_insert_with(|| self.fresh(make)).clone()""",
     """            if let Some(s) = crate::sync::lock(&self.map).get(&key) {
                return s.clone();
            }
            let slot = self.fresh(make);
            crate::sync::lock(&self.map).insert(key, slot.clone());
            slot"""),
    ("registry", "src/slots.rs",
     "an exiting actor removes the entry without checking its generation",
     """            if map.get(&key).is_some_and(|s| s.generation == generation) {""",
     """            if map.contains_key(&key) {"""),
    ("handoff", "src/handoff.rs",
     "shutdown drops what was accepted: next_group checks `closed` before the items",
     """        loop {
            if !st.items.is_empty() {""",
     """        loop {
            if st.closed {
                return None;
            }
            if !st.items.is_empty() {"""),
    ("handoff", "src/handoff.rs",
     "the writer goes to sleep without saying so: producers skip the notification",
     """            st.waiting = true;
""",
     """"""),
    ("lease", "src/coord/lease.rs",
     "non-atomic token increment: check and take in two critical sections",
     """        let mut slots = lock(&self.slots);
        let slot = slots.entry(event).or_default();
        if let Some((holder, expires)) = slot.holder {
            if holder != owner && expires > now_ms {
                return None;
            }
        }
        let token = slot.last.max(floor) + 1;""",
     """        let token = {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(event).or_default();
            if let Some((holder, expires)) = slot.holder {
                if holder != owner && expires > now_ms {
                    return None;
                }
            }
            slot.last.max(floor) + 1
        };
        let mut slots = lock(&self.slots);
        let slot = slots.entry(event).or_default();"""),
    ("fastpath", "src/slots.rs",
     "the sold-out flag published with Relaxed ordering",
     """        self.0.store(true, Ordering::Release);""",
     """        self.0.store(true, Ordering::Relaxed);"""),
]

def run_model(test):
    env = dict(os.environ, RUSTFLAGS="--cfg ticketd_loom", CARGO_TARGET_DIR="target-loom",
               LOOM_MAX_PREEMPTIONS="2")
    r = subprocess.run(["cargo", "test", "-q", "-p", "loom-tests", "--release", "--test", test],
                       env=env, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr

def main():
    wanted = set(sys.argv[1:])
    failures = 0
    for test, path, what, old, new in MUTANTS:
        if wanted and test not in wanted:
            continue
        original = open(path).read()
        if old not in original:
            print(f"[{test}] cannot apply the mutant (code changed?): {what}")
            failures += 1
            continue
        try:
            open(path, "w").write(original.replace(old, new, 1))
            rc, out = run_model(test)
        finally:
            open(path, "w").write(original)
        caught = rc != 0 and "panicked" in out
        line = next((l for l in out.splitlines() if "panicked at" in l or "assert" in l), "")
        print(f"[{test}] bug: {what}\n    model {'FAILED as it must' if caught else 'PASSED: the model is blind to this bug'}"
              + (f"\n    {line.strip()}" if caught else ""))
        failures += 0 if caught else 1
    rc, _ = run_model("registry")  # the restored code passes again
    print("restored code:", "models pass" if rc == 0 else "MODELS FAIL")
    sys.exit(1 if failures or rc != 0 else 0)

if __name__ == "__main__":
    main()
