{#-
    Clicks that are not people (var('link_preview_agents'), in dbt_project.yml).

    is_link_preview_agent(user_agent): true when the agent contains a fragment of
    var('link_preview_agents') and none of var('link_preview_agent_exceptions'), compared
    lower-case; false for a missing agent.

    counts_prefetch_clicks(): whether var('count_prefetch_clicks') lets link previews and
    scanners count as clicks (true/false from YAML or from `--vars` on the command line).
-#}

{% macro is_link_preview_agent(user_agent) -%}
    {%- set agent = 'lower(' ~ user_agent ~ ')' -%}
    coalesce(
        (
            {%- for fragment in var('link_preview_agents') %}
            {{ 'or ' if not loop.first }}{{ dbt.position(quoted_agent_fragment(fragment), agent) }} > 0
            {%- endfor %}
        )
        {%- for fragment in var('link_preview_agent_exceptions', []) %}
        and {{ dbt.position(quoted_agent_fragment(fragment), agent) }} = 0
        {%- endfor %},
        false
    )
{%- endmacro %}

{% macro quoted_agent_fragment(fragment) -%}
    '{{ fragment | string | lower | replace("'", "''") }}'
{%- endmacro %}

{% macro counts_prefetch_clicks() -%}
    {{ return(var('count_prefetch_clicks') | string | lower in ['true', '1', 'yes']) }}
{%- endmacro %}
