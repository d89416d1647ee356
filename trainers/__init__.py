"""Training: distributed set-up, the run folder, the shared loop and schedules, and the three trainers."""
