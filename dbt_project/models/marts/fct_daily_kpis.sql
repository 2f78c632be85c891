-- One row per day on which messages were sent (UTC), with what those messages achieved.
-- Settled: delivered, undelivered or failed by a final receipt; awaiting_receipt: sent, no
-- final receipt yet. Clicks are people's; link previews and scanners are in prefetch_clicks.

with

messages as (

    select * from {{ ref('fct_messages') }}
    where sent_at is not null

),

final as (

    select
        cast({{ dbt.date_trunc('day', 'sent_at') }} as date) as day,
        count(*) as messages_sent,
        cast(sum(case when campaign_kind = 'promo' then 1 else 0 end) as bigint) as promo_sent,
        cast(sum(case when campaign_kind = 'service' then 1 else 0 end) as bigint) as service_sent,
        cast(sum(case when status = 'delivered' then 1 else 0 end) as bigint) as delivered,
        cast(sum(case when status in ('undelivered', 'failed') then 1 else 0 end) as bigint) as failed,
        cast(sum(case when is_settled then 1 else 0 end) as bigint) as settled,
        cast(sum(case when is_awaiting_receipt then 1 else 0 end) as bigint) as awaiting_receipt,
        cast(sum(case when clicked then 1 else 0 end) as bigint) as clicks,
        cast(sum(prefetch_clicks) as bigint) as prefetch_clicks,
        cast(sum(case when opted_out_after then 1 else 0 end) as bigint) as opt_outs,
        cast(sum(conversions) as bigint) as conversions,
        sum(revenue) as revenue,
        cast(sum(segments) as bigint) as segments,
        sum(cost) as cost
    from messages
    group by 1

)

select * from final
