"""message_broker: user balances changed by tasks applied reliably from PostgreSQL."""

__version__ = "0.1.0"
