"""The wire contract between tiers: ``tiers.proto``, its generated code, and the numpy tensor codec."""
