"""`tensorguard bench datapath`: the datapath measured against the same traffic without the agent."""
