{#
    Wilson score interval for a binomial proportion (successes out of trials), 95% by
    default (z = 1.959964):

        centre     = (p + z²/2n) / (1 + z²/n)
        half-width = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²)

    Null when there are no trials (greatest/least skip nulls, hence the case; every
    division also goes through nullif). No successes give a lower bound of exactly 0 and
    all successes an upper bound of exactly 1 (the formula lands a rounding error away).
    Successes above the trials (a click recorded before its delivery receipt) are capped
    at the trials, so a bound never leaves [0, 1].
#}

{% macro wilson_low(successes, trials, z=1.959964) -%}
    case
        when coalesce({{ trials }}, 0) <= 0 then null
        when {{ successes }} <= 0 then 0.0
        else greatest(0.0, {{ _wilson_bound(successes, trials, z, '-') }})
    end
{%- endmacro %}

{% macro wilson_high(successes, trials, z=1.959964) -%}
    case
        when coalesce({{ trials }}, 0) <= 0 then null
        when {{ successes }} >= {{ trials }} then 1.0
        else least(1.0, {{ _wilson_bound(successes, trials, z, '+') }})
    end
{%- endmacro %}

{% macro _wilson_bound(successes, trials, z, sign) -%}
    {%- set n = 'nullif(cast(' ~ trials ~ ' as double precision), 0)' -%}
    {%- set p = '(least(cast(' ~ successes ~ ' as double precision), ' ~ n ~ ') / ' ~ n ~ ')' -%}
    {%- set z2 = (z * z) | string -%}
    (
        ({{ p }} + {{ z2 }} / (2 * {{ n }}))
        {{ sign }} {{ z }} * sqrt({{ p }} * (1 - {{ p }}) / {{ n }} + {{ z2 }} / (4 * {{ n }} * {{ n }}))
    ) / (1 + {{ z2 }} / {{ n }})
{%- endmacro %}
