"""Per-session egress: the policy model, the host resolver and the host firewall sets (README, "Egress")."""
