"""The runtime every job runs on: the Job type, the run envelope, the driver loop, Ray set-up."""
