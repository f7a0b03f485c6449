"""The proxy: asyncio glue over http/, routing, balancing, the exchange, node pools."""
