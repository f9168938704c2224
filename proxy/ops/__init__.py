"""What lets an operator see and steer the proxy: status page, events, admin, alerts, reload, logs."""
