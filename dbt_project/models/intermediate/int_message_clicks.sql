-- Clicks per message: how many people's clicks, the first and the last, and apart from them
-- how many requests came from link previews and scanners (int_clicks_classified.is_prefetch), which
-- count as clicks only when var('count_prefetch_clicks') is true. A message whose links only
-- a preview fetched has 0 clicks and no first click.

{%- set counted = 'true' if counts_prefetch_clicks() else 'not is_prefetch' %}

with

clicks as (

    select * from {{ ref('int_clicks_classified') }}

),

final as (

    select
        message_id,
        cast(sum(case when {{ counted }} then 1 else 0 end) as bigint) as clicks,
        cast(sum(case when is_prefetch then 1 else 0 end) as bigint) as prefetch_clicks,
        min(case when {{ counted }} then clicked_at end) as first_clicked_at,
        max(case when {{ counted }} then clicked_at end) as last_clicked_at
    from clicks
    group by 1

)

select * from final
