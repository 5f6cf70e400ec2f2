"""vel under other agent frameworks. Each integration imports its framework lazily and lives in
an optional extra: ``vel.integrations.openai_agents`` (extra ``agents``)."""
