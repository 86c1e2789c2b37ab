"""Cluster tools: submit a job to a running Ray cluster; fire a scheduled RayJob from a CronJob pod."""
